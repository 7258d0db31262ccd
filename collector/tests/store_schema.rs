//! The store's schema on a real file: a store written by the previous schema
//! (version 1, kept as `store_fixtures/schema_v1.sql`) is refused with both
//! versions named and left untouched; version 2 keeps ids as BLOBs, one
//! `resources` row per producer, and shows version 1's columns through the
//! `spans` view.

use std::path::Path;
use std::process::Command;

use kms_collector::store::{
    Batch, ReadError, Reader, Record, SpanRow, SqliteReader, SqliteStore, StoreError, TimeWindow,
    Writer, SCHEMA_VERSION,
};
use rusqlite::{params, Connection};
use serde_json::json;

const SCHEMA_V1: &str = include_str!("store_fixtures/schema_v1.sql");

/// A store file as collector version 1 left it: its pragmas, its schema,
/// one span row with hex ids and the resource JSON inline.
fn write_v1_store(path: &Path) {
    let conn = Connection::open(path).expect("create v1 store");
    conn.execute_batch(
        "PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;",
    )
    .expect("v1 pragmas");
    conn.execute_batch(SCHEMA_V1).expect("v1 schema");
    conn.execute(
        "INSERT INTO spans (trace_id, span_id, name, kind, service, scope, start_ns, end_ns, \
         attributes, resource, received_ns) VALUES ('4bf92f3577b34da6a3ce929d0e0e4736', \
         '00f067aa0ba902b7', 'kms.request', 2, 'dstack-kms', 'instrumented-kms', 1, 2, \
         '{\"rpc.method\":\"GetMeta\"}', '{\"service.name\":\"dstack-kms\"}', 3)",
        [],
    )
    .expect("v1 span");
}

fn version_and_spans(path: &Path) -> (i64, i64, Option<String>) {
    let conn = Connection::open(path).expect("reopen");
    let version = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("version");
    let spans = conn
        .query_row("SELECT COUNT(*) FROM spans", [], |r| r.get(0))
        .expect("v1 spans table");
    let kind = conn
        .query_row(
            "SELECT type FROM sqlite_master WHERE name = 'spans'",
            [],
            |r| r.get(0),
        )
        .ok();
    (version, spans, kind)
}

#[test]
fn a_version_1_store_is_refused_by_name_and_left_as_it_was() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("kms-diag.sqlite");
    write_v1_store(&path);
    assert_eq!(SCHEMA_VERSION, 2);

    let err = SqliteStore::open(&path).expect_err("a v1 store opened for writing");
    assert!(
        matches!(
            err,
            StoreError::SchemaTooOld {
                found: 1,
                expected: 2
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("version 1") && text.contains("version 2"),
        "{text}"
    );

    let err = SqliteReader::open(&path).expect_err("a v1 store opened for reading");
    assert!(
        matches!(
            err,
            ReadError::SchemaVersion {
                found: 1,
                expected: 2,
                ..
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("version 1")
            && text.contains("version 2")
            && text.contains("kms-diag.sqlite"),
        "{text}"
    );

    // The commands say the same and exit non-zero.
    let out = Command::new(env!("CARGO_BIN_EXE_kms-collector"))
        .args(["report", "--db"])
        .arg(&path)
        .output()
        .expect("run report");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("schema version 1")
            && stderr.contains("version 2"),
        "{stderr}"
    );

    assert_eq!(
        version_and_spans(&path),
        (1, 1, Some("table".into())),
        "the v1 file was changed"
    );
}

fn span(trace: u8, id: u8, parent: Option<u8>, pid: i64) -> SpanRow {
    SpanRow {
        trace_id: format!("{trace:02x}{}", "ab".repeat(15)),
        span_id: format!("{id:02X}{}", "CD".repeat(7)),
        parent_span_id: parent.map(|p| format!("{p:02x}{}", "cd".repeat(7))),
        name: "kms.request".into(),
        kind: 2,
        service: Some("dstack-kms".into()),
        scope: Some("instrumented-kms".into()),
        start_ns: 1_000 + i64::from(id),
        end_ns: 2_000,
        status_code: 0,
        status_message: None,
        incomplete: false,
        snapshot_seq: None,
        attributes: json!({"rpc.method": "GetMeta"}),
        events: json!([]),
        resource: json!({"service.name": "dstack-kms", "process.pid": pid}),
        received_ns: 10,
    }
}

#[test]
fn spans_keep_blob_ids_and_share_their_producer_row() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("kms-diag.sqlite");
    let mut store = SqliteStore::open(&path).expect("open");
    let batch = Batch {
        spans: vec![
            span(1, 1, None, 7),
            span(1, 2, Some(1), 7),
            span(2, 3, None, 7),
            span(3, 4, None, 8),
        ],
        ..Batch::default()
    };
    store.write(&[Record::Batch(batch.clone())]).expect("write");
    // Again, from a fresh store on the same file: the rows are found, not added.
    drop(store);
    let mut store = SqliteStore::open(&path).expect("reopen");
    store.write(&[Record::Batch(batch)]).expect("rewrite");
    let conn = store.connection();
    let q = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).expect(sql) };
    assert_eq!(
        q("SELECT COUNT(*) FROM resources"),
        2,
        "one row per producer"
    );
    assert_eq!(q("SELECT COUNT(*) FROM span_rows"), 4);
    assert_eq!(
        q("SELECT COUNT(*) FROM span_rows WHERE typeof(trace_id) = 'blob' AND length(trace_id) = 16 \
           AND typeof(span_id) = 'blob' AND length(span_id) = 8"),
        4
    );
    // The view reads as version 1 did: lowercase hex, resource JSON.
    let (trace, span_id, parent, resource): (String, String, String, String) = conn
        .query_row(
            "SELECT trace_id, span_id, parent_span_id, resource FROM spans WHERE parent_span_id IS NOT NULL",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .expect("view");
    assert_eq!(trace, format!("01{}", "ab".repeat(15)));
    assert_eq!(span_id, format!("02{}", "cd".repeat(7)));
    assert_eq!(parent, format!("01{}", "cd".repeat(7)));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&resource).expect("json"),
        json!({"service.name": "dstack-kms", "process.pid": 7})
    );

    // The reader gives back what was written.
    let reader = SqliteReader::open(&path).expect("reader");
    let trace = reader
        .trace(&format!("01{}", "AB".repeat(15)))
        .expect("trace");
    assert_eq!(trace.len(), 2);
    assert_eq!(trace[1].parent_span_id, Some(trace[0].span_id.clone()));
    assert_eq!(trace[1].scope.as_deref(), Some("instrumented-kms"));
    let all = reader.spans(TimeWindow::ALL, 10).expect("spans");
    assert_eq!(all[3].resource["process.pid"], 8);
    assert!(reader.trace("not hex").expect("trace").is_empty());
}

#[test]
fn a_hand_made_span_id_that_is_not_hex_fails_the_whole_write() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut store = SqliteStore::open(dir.path().join("kms-diag.sqlite")).expect("open");
    let mut bad = span(9, 9, None, 7);
    bad.span_id = "zz".into();
    let err = store
        .write(&[Record::Batch(Batch {
            spans: vec![span(1, 1, None, 7), bad],
            ..Batch::default()
        })])
        .expect_err("a span id that is not hex was stored");
    assert!(
        matches!(err, StoreError::InvalidId { ref id } if id == "zz"),
        "{err:?}"
    );
    let n: i64 = store
        .connection()
        .query_row("SELECT COUNT(*) FROM span_rows", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 0, "part of a failed write was stored");
}

#[test]
fn rows_inserted_into_the_view_follow_the_merge_rule() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path().join("kms-diag.sqlite")).expect("open");
    let conn = store.connection();
    let insert = |incomplete: bool, seq: Option<i64>, end: i64| {
        conn.execute(
            "INSERT INTO spans (trace_id, span_id, name, service, scope, start_ns, end_ns, \
             incomplete, snapshot_seq, resource, received_ns) \
             VALUES ('0af7651916cd43dd8448eb211c80319c', 'B7AD6B7169203331', 'kms.request', \
             'dstack-kms', 'instrumented-kms', 1, ?1, ?2, ?3, '{}', ?1)",
            params![end, incomplete, seq],
        )
        .expect("insert into the view");
    };
    let stored = || -> (i64, i64) {
        conn.query_row(
            "SELECT incomplete, end_ns FROM spans WHERE span_id = 'b7ad6b7169203331'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("one row")
    };
    insert(true, Some(2), 20);
    insert(true, Some(1), 30);
    assert_eq!(stored(), (1, 20), "an older snapshot replaced a newer one");
    insert(false, None, 25);
    insert(true, Some(3), 40);
    assert_eq!(stored(), (0, 25), "a snapshot replaced the closed span");
    let resources: i64 = conn
        .query_row("SELECT COUNT(*) FROM resources", [], |r| r.get(0))
        .expect("count");
    assert_eq!(resources, 1);
}
