//! The store's schema on a real file: a store written by an earlier schema
//! (versions 1 and 2, kept as `store_fixtures/schema_v1.sql` and
//! `schema_v2.sql`) is refused with both versions named and left untouched;
//! version 3 keeps ids as BLOBs, one `resources` row per producer, one
//! `operations` row per service and span name, and shows version 1's
//! columns through the `spans` view.

use std::path::Path;
use std::process::Command;

use kms_collector::store::{
    Batch, ReadError, Reader, Record, SpanRow, SqliteReader, SqliteStore, StoreError, TimeWindow,
    Writer, SCHEMA_VERSION,
};
use rusqlite::{params, Connection};
use serde_json::json;

/// The schemas of earlier collectors, by version.
const EARLIER: [(i64, &str); 2] = [
    (1, include_str!("store_fixtures/schema_v1.sql")),
    (2, include_str!("store_fixtures/schema_v2.sql")),
];

/// A store file as the collector of `version` left it: its pragmas, its
/// schema, one span row (written through `spans`, a table in version 1 and
/// a view with an insert trigger in version 2).
fn write_earlier_store(path: &Path, version: i64, schema: &str) {
    let conn = Connection::open(path).expect("create an earlier store");
    conn.execute_batch(
        "PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;",
    )
    .expect("earlier pragmas");
    conn.execute_batch(schema).expect("earlier schema");
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("version");
    assert_eq!(found, version, "the fixture is not version {version}");
    conn.execute(
        "INSERT INTO spans (trace_id, span_id, name, kind, service, scope, start_ns, end_ns, \
         attributes, resource, received_ns) VALUES ('4bf92f3577b34da6a3ce929d0e0e4736', \
         '00f067aa0ba902b7', 'kms.request', 2, 'dstack-kms', 'instrumented-kms', 1, 2, \
         '{\"rpc.method\":\"GetMeta\"}', '{\"service.name\":\"dstack-kms\"}', 3)",
        [],
    )
    .expect("earlier span");
}

/// The file's version, its spans, its objects and their SQL: what must not
/// change when a collector refuses it.
fn fingerprint(path: &Path) -> (i64, i64, Vec<(String, Option<String>)>) {
    let conn = Connection::open(path).expect("reopen");
    let version = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("version");
    let spans = conn
        .query_row("SELECT COUNT(*) FROM spans", [], |r| r.get(0))
        .expect("earlier spans");
    let mut stmt = conn
        .prepare("SELECT name, sql FROM sqlite_master ORDER BY name")
        .expect("schema");
    let objects = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("schema rows")
        .collect::<Result<_, _>>()
        .expect("schema rows");
    (version, spans, objects)
}

#[test]
fn earlier_stores_are_refused_by_name_and_left_as_they_were() {
    assert_eq!(SCHEMA_VERSION, 3);
    for (version, schema) in EARLIER {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("kms-diag.sqlite");
        write_earlier_store(&path, version, schema);
        let before = fingerprint(&path);
        assert_eq!(before.1, 1);
        let named =
            |text: &str| text.contains(&format!("version {version}")) && text.contains("version 3");

        let err = SqliteStore::open(&path).expect_err("an earlier store opened for writing");
        assert!(
            matches!(err, StoreError::SchemaTooOld { found, expected: 3 } if found == version),
            "{err:?}"
        );
        assert!(named(&err.to_string()), "{err}");

        let err = SqliteReader::open(&path).expect_err("an earlier store opened for reading");
        assert!(
            matches!(
                err,
                ReadError::SchemaVersion { found, expected: 3, .. } if found == version
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(named(&text) && text.contains("kms-diag.sqlite"), "{text}");

        // The commands say the same and exit non-zero.
        for command in [
            &["report", "--db"][..],
            &["export", "--format", "otlp-json", "--db"],
        ] {
            let out = Command::new(env!("CARGO_BIN_EXE_kms-collector"))
                .args(command)
                .arg(&path)
                .output()
                .expect("run the command");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && named(&stderr),
                "{command:?}: {stderr}"
            );
        }

        assert_eq!(
            fingerprint(&path),
            before,
            "the version {version} file was changed"
        );
    }
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
fn spans_keep_blob_ids_and_share_their_producer_and_operation_rows() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("kms-diag.sqlite");
    let mut store = SqliteStore::open(&path).expect("open");
    let batch = Batch {
        spans: vec![
            span(1, 1, None, 7),
            span(1, 2, Some(1), 7),
            SpanRow {
                name: "kms.outbound".into(),
                ..span(2, 3, None, 7)
            },
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
    assert_eq!(
        q("SELECT COUNT(*) FROM operations"),
        2,
        "one row per service and span name"
    );
    assert_eq!(q("SELECT COUNT(*) FROM span_rows"), 4);
    assert_eq!(
        q("SELECT COUNT(*) FROM span_rows WHERE typeof(trace_id) = 'blob' AND length(trace_id) = 16 \
           AND typeof(span_id) = 'blob' AND length(span_id) = 8"),
        4
    );
    // The view reads as version 1 did: lowercase hex, name and service as
    // text, resource JSON.
    let (trace, span_id, parent, resource): (String, String, String, String) = conn
        .query_row(
            "SELECT trace_id, span_id, parent_span_id, resource FROM spans WHERE parent_span_id IS NOT NULL",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .expect("view");
    assert_eq!(
        q("SELECT COUNT(*) FROM spans WHERE name = 'kms.outbound' AND service = 'dstack-kms'"),
        1
    );
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
    assert_eq!(all[2].name, "kms.outbound");
    assert_eq!(all[2].service.as_deref(), Some("dstack-kms"));
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

    // A write that added an operation row and then failed: the store must
    // not keep the rolled-back row's id for the next write.
    let new_name = SpanRow {
        name: "kms.new".into(),
        ..span(1, 1, None, 7)
    };
    let mut bad = span(9, 9, None, 7);
    bad.trace_id = "not hex".into();
    store
        .write(&[
            Record::Batch(Batch {
                spans: vec![new_name.clone()],
                ..Batch::default()
            }),
            Record::Batch(Batch {
                spans: vec![bad],
                ..Batch::default()
            }),
        ])
        .expect_err("a trace id that is not hex was stored");
    store
        .write(&[Record::Batch(Batch {
            spans: vec![new_name],
            ..Batch::default()
        })])
        .expect("write");
    let names: String = store
        .connection()
        .query_row("SELECT group_concat(name) FROM spans", [], |r| r.get(0))
        .expect("names");
    assert_eq!(names, "kms.new", "the span lost its operation");
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
    let rows = |table: &str| -> i64 {
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .expect("count")
    };
    assert_eq!((rows("resources"), rows("operations")), (1, 1));
}
