//! Reading the store: the [`Reader`] trait the diagnosis and the exports use,
//! and its SQLite implementation on a read-only connection.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};
use serde_json::Value;

use super::encoded::{hex, RawId};
use super::SCHEMA_VERSION;

use super::model::{
    ConsoleAsyncOpRow, ConsoleResourceRow, ConsoleSnapshot, ConsoleTaskRow, EventRow, ProbeAttempt,
    ProbeOutcome, SpanRow,
};
use super::search::{self, FoundTrace, OperationName, ServiceLink, TraceQuery};

/// A closed interval of Unix nanoseconds, `[from_ns, to_ns]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TimeWindow {
    /// First instant included.
    pub from_ns: i64,
    /// Last instant included.
    pub to_ns: i64,
}

impl TimeWindow {
    /// Everything ever stored.
    pub const ALL: TimeWindow = TimeWindow {
        from_ns: i64::MIN,
        to_ns: i64::MAX,
    };

    /// A window from `from_ns` to `to_ns` (both included).
    pub fn new(from_ns: i64, to_ns: i64) -> Self {
        TimeWindow { from_ns, to_ns }
    }

    /// True when `t` lies inside the window.
    pub fn contains(&self, t: i64) -> bool {
        self.from_ns <= t && t <= self.to_ns
    }

    /// True when `[start, end]` overlaps the window.
    pub fn overlaps(&self, start: i64, end: i64) -> bool {
        start <= self.to_ns && end >= self.from_ns
    }
}

/// What the store holds, in time: the first and last instants of any stored
/// fact (span start or snapshot time, event, probe attempt, console snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DataBounds {
    /// Earliest stored instant.
    pub first_ns: i64,
    /// Latest stored instant.
    pub last_ns: i64,
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The store file could not be opened.
    #[error("opening store {path} read-only: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The file opened but is not a kms-collector store (no `spans` table).
    #[error("{path} is not a kms-collector store (no spans table)")]
    NotAStore {
        /// The file.
        path: PathBuf,
    },
    /// The file is a store of another schema version (`PRAGMA
    /// user_version`): written by an older or newer collector, whose own
    /// `report` and `export` read it.
    #[error(
        "{path} has store schema version {found}; this kms-collector reads version {expected} \
         only (read it with the collector that wrote it)"
    )]
    SchemaVersion {
        /// The file.
        path: PathBuf,
        /// `PRAGMA user_version` of the file.
        found: i64,
        /// The version this collector reads.
        expected: i64,
    },
    /// A query failed.
    #[error("reading the store: {0}")]
    Query(#[from] rusqlite::Error),
}

/// Read access to stored telemetry.
///
/// # What a reader may assume
///
/// - Spans are merged by `(trace_id, span_id)` as `docs/wire-format.md`
///   states: at most one row per span; a closed span (`incomplete == false`)
///   is final; an `incomplete` row is the newest open-span snapshot seen and
///   its `end_ns` is the snapshot time (the span was still open then).
/// - Times are Unix nanoseconds from the producer's clock (probe attempts and
///   console snapshots: the collector's clock, which on a CVM host is the
///   same machine or close to it). Ids are lowercase hex.
/// - Every method returns a consistent view of one moment: a result never
///   holds half of an ingested batch (the writer commits a batch atomically).
/// - Results are ordered as each method says; windows are inclusive.
/// - Data may be missing (sampling, drops, a feature not compiled in): an
///   empty result means "nothing stored", never "nothing happened".
///   Attribute JSON that fails to parse reads as an empty object.
///
/// Implementations read only; they never change the store.
pub trait Reader {
    /// First and last instants of stored facts, or `None` for an empty store.
    fn bounds(&self) -> Result<Option<DataBounds>, ReadError>;

    /// Open-span snapshots (`incomplete`) whose open interval
    /// `[start_ns, end_ns]` overlaps `window`, oldest start first.
    fn incomplete_spans(&self, window: TimeWindow) -> Result<Vec<SpanRow>, ReadError>;

    /// All spans of one trace, oldest start first.
    fn trace(&self, trace_id: &str) -> Result<Vec<SpanRow>, ReadError>;

    /// Spans named `name` that started inside `window`, oldest first, at most
    /// `limit` of them.
    fn spans_started(
        &self,
        window: TimeWindow,
        name: &str,
        limit: usize,
    ) -> Result<Vec<SpanRow>, ReadError>;

    /// How many spans named `name` started inside `window`.
    fn count_spans_started(&self, window: TimeWindow, name: &str) -> Result<u64, ReadError>;

    /// All spans that started inside `window`, oldest first, at most `limit`.
    fn spans(&self, window: TimeWindow, limit: usize) -> Result<Vec<SpanRow>, ReadError>;

    /// Events named `name` inside `window`, oldest first.
    fn events(&self, name: &str, window: TimeWindow) -> Result<Vec<EventRow>, ReadError>;

    /// Events inside `window` whose body contains `needle` (any name), oldest
    /// first, at most `limit`.
    fn events_with_body(
        &self,
        needle: &str,
        window: TimeWindow,
        limit: usize,
    ) -> Result<Vec<EventRow>, ReadError>;

    /// Probe attempts started inside `window`, oldest first.
    fn probe_attempts(&self, window: TimeWindow) -> Result<Vec<ProbeAttempt>, ReadError>;

    /// Times of the console snapshots inside `window`, oldest first.
    fn console_snapshot_times(&self, window: TimeWindow) -> Result<Vec<i64>, ReadError>;

    /// The console snapshot taken at `snapshot_ns` (empty if none).
    fn console_snapshot(&self, snapshot_ns: i64) -> Result<ConsoleSnapshot, ReadError>;

    /// Every distinct span `service`, sorted, answered from an index.
    fn services(&self) -> Result<Vec<String>, ReadError>;

    /// Every distinct span name of `service`, sorted, answered from an index.
    fn operations(&self, service: &str) -> Result<Vec<OperationName>, ReadError>;

    /// Traces holding a span that meets every condition of `query`, newest
    /// matching span first, at most `query.limit`; walks an index range,
    /// never the whole table (see [`TraceQuery`] for the matching rules).
    fn find_traces(&self, query: &TraceQuery) -> Result<Vec<FoundTrace>, ReadError>;

    /// Calls between services (and to uninstrumented `kms.peer`s) by spans
    /// that started inside `window`.
    fn service_links(&self, window: TimeWindow) -> Result<Vec<ServiceLink>, ReadError>;
}

/// A [`Reader`] on a SQLite store file, through a read-only connection.
#[derive(Debug)]
pub struct SqliteReader {
    conn: Connection,
}

/// A span with its operation and producer, as [`span_row`] reads it;
/// queries add `WHERE` clauses on `s` (`span_rows`).
const SPAN_SELECT: &str = "SELECT s.trace_id, s.span_id, s.parent_span_id, o.name, s.kind, \
     o.service, s.resource_id, s.start_ns, s.end_ns, s.status_code, s.status_message, \
     s.incomplete, s.snapshot_seq, s.attributes, s.events, s.received_ns, r.scope, \
     r.attributes FROM span_rows s JOIN operations o ON o.id = s.operation_id \
     LEFT JOIN resources r ON r.id = s.resource_id";

const EVENT_COLUMNS: &str =
    "time_ns, name, severity, trace_id, span_id, service, body, attributes, received_ns";

impl SqliteReader {
    /// Opens the store at `path` read-only. The file must exist and hold the
    /// schema (`SCHEMA_SQL`); a collector may be writing it at the same time
    /// (WAL mode lets readers and the writer proceed together).
    ///
    /// # Errors
    ///
    /// [`ReadError::Open`] when SQLite cannot open the file,
    /// [`ReadError::NotAStore`] when it has no `spans` table,
    /// [`ReadError::SchemaVersion`] when another collector version wrote it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ReadError> {
        let path = path.as_ref();
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| ReadError::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::from_connection(conn).map_err(|e| match e {
            ReadError::NotAStore { .. } => ReadError::NotAStore {
                path: path.to_owned(),
            },
            ReadError::SchemaVersion {
                found, expected, ..
            } => ReadError::SchemaVersion {
                path: path.to_owned(),
                found,
                expected,
            },
            other => other,
        })
    }

    /// Wraps an already open connection (read-write connections work too;
    /// this reader never writes through it).
    ///
    /// # Errors
    ///
    /// [`ReadError::NotAStore`] when the database has no `spans` table,
    /// [`ReadError::SchemaVersion`] when it is a store of another version.
    pub fn from_connection(conn: Connection) -> Result<Self, ReadError> {
        let path = || PathBuf::from(conn.path().unwrap_or(""));
        let has_spans: Option<i64> = conn
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type IN ('table', 'view') AND name = 'spans'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if has_spans.is_none() {
            return Err(ReadError::NotAStore { path: path() });
        }
        let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found != SCHEMA_VERSION {
            return Err(ReadError::SchemaVersion {
                path: path(),
                found,
                expected: SCHEMA_VERSION,
            });
        }
        // Large scans for the report: give SQLite room, keep temp data in memory.
        conn.execute_batch("PRAGMA cache_size = -65536; PRAGMA temp_store = MEMORY;")?;
        Ok(SqliteReader { conn })
    }
}

fn json(text: Option<String>, empty: &str) -> Value {
    text.and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| serde_json::from_str(empty).unwrap_or(Value::Null))
}

/// A stored id as lowercase hex (`None` for NULL).
fn id_hex(r: &Row<'_>, i: usize) -> rusqlite::Result<Option<String>> {
    Ok(match r.get_ref(i)? {
        ValueRef::Null => None,
        ValueRef::Blob(b) => Some(hex(b)),
        ValueRef::Text(t) => Some(String::from_utf8_lossy(t).to_ascii_lowercase()),
        ValueRef::Integer(n) => Some(format!("{n:016x}")),
        ValueRef::Real(x) => Some(x.to_string()),
    })
}

/// Producers already read in one query, by `resources.id`: their scope and
/// parsed attributes, so that each resource's JSON is parsed once.
type SeenResources = HashMap<i64, (Option<String>, Value)>;

/// One row of [`SPAN_SELECT`].
fn span_row(r: &Row<'_>, seen: &mut SeenResources) -> rusqlite::Result<SpanRow> {
    let resource_id: Option<i64> = r.get(6)?;
    let (scope, resource) = match resource_id.and_then(|id| seen.get(&id)) {
        Some(known) => known.clone(),
        None => {
            let known = (r.get::<_, Option<String>>(16)?, json(r.get(17)?, "{}"));
            if let Some(id) = resource_id {
                seen.insert(id, known.clone());
            }
            known
        }
    };
    Ok(SpanRow {
        trace_id: id_hex(r, 0)?.unwrap_or_default(),
        span_id: id_hex(r, 1)?.unwrap_or_default(),
        parent_span_id: id_hex(r, 2)?,
        name: r.get(3)?,
        kind: r.get(4)?,
        service: r.get(5)?,
        scope,
        start_ns: r.get(7)?,
        end_ns: r.get(8)?,
        status_code: r.get(9)?,
        status_message: r.get(10)?,
        incomplete: r.get::<_, i64>(11)? != 0,
        snapshot_seq: r.get(12)?,
        attributes: json(r.get(13)?, "{}"),
        events: json(r.get(14)?, "[]"),
        resource,
        received_ns: r.get(15)?,
    })
}

/// Runs a [`SPAN_SELECT`] query.
fn query_spans(
    conn: &Connection,
    sql: &str,
    args: impl rusqlite::Params,
) -> Result<Vec<SpanRow>, ReadError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut seen = SeenResources::new();
    let rows = stmt.query_map(args, |r| span_row(r, &mut seen))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn event_row(r: &Row<'_>) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        time_ns: r.get(0)?,
        name: r.get(1)?,
        severity: r.get(2)?,
        trace_id: r.get(3)?,
        span_id: r.get(4)?,
        service: r.get(5)?,
        body: r.get(6)?,
        attributes: json(r.get(7)?, "{}"),
        received_ns: r.get(8)?,
    })
}

fn probe_row(r: &Row<'_>) -> rusqlite::Result<ProbeAttempt> {
    let outcome: String = r.get(3)?;
    let status: Option<i64> = r.get(4)?;
    Ok(ProbeAttempt {
        time_ns: r.get(0)?,
        target: r.get(1)?,
        latency_ms: r.get(2)?,
        outcome: ProbeOutcome::parse(&outcome).unwrap_or(ProbeOutcome::Other),
        http_status: status.and_then(|s| u16::try_from(s).ok()),
        error: r.get(5)?,
    })
}

fn to_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

impl Reader for SqliteReader {
    fn bounds(&self) -> Result<Option<DataBounds>, ReadError> {
        // Each part is answered from an index (or a small table), so this
        // stays cheap on a store with millions of spans.
        // One aggregate per query, so SQLite answers MIN/MAX from an index
        // (or a small table): cheap on a store with millions of spans.
        let parts = [
            (
                "SELECT MIN(start_ns) FROM span_rows",
                "SELECT MAX(start_ns) FROM span_rows",
            ),
            (
                "SELECT MIN(start_ns) FROM span_rows WHERE incomplete = 1",
                "SELECT MAX(end_ns) FROM span_rows WHERE incomplete = 1",
            ),
            (
                "SELECT MIN(time_ns) FROM events",
                "SELECT MAX(time_ns) FROM events",
            ),
            (
                "SELECT MIN(time_ns) FROM probe_attempts",
                "SELECT MAX(time_ns) FROM probe_attempts",
            ),
            (
                "SELECT MIN(snapshot_ns) FROM console_tasks",
                "SELECT MAX(snapshot_ns) FROM console_tasks",
            ),
        ];
        let mut bounds: Option<DataBounds> = None;
        for (lo_sql, hi_sql) in parts {
            let lo: Option<i64> = self.conn.query_row(lo_sql, [], |r| r.get(0))?;
            let hi: Option<i64> = self.conn.query_row(hi_sql, [], |r| r.get(0))?;
            if let (Some(lo), Some(hi)) = (lo, hi) {
                bounds = Some(match bounds {
                    None => DataBounds {
                        first_ns: lo,
                        last_ns: hi,
                    },
                    Some(b) => DataBounds {
                        first_ns: b.first_ns.min(lo),
                        last_ns: b.last_ns.max(hi),
                    },
                });
            }
        }
        Ok(bounds)
    }

    fn incomplete_spans(&self, window: TimeWindow) -> Result<Vec<SpanRow>, ReadError> {
        let sql = format!(
            "{SPAN_SELECT} WHERE s.incomplete = 1 \
             AND s.start_ns <= ?1 AND s.end_ns >= ?2 ORDER BY s.start_ns, s.trace_id, s.span_id"
        );
        query_spans(&self.conn, &sql, params![window.to_ns, window.from_ns])
    }

    fn trace(&self, trace_id: &str) -> Result<Vec<SpanRow>, ReadError> {
        // An id that is not hex names no stored trace.
        let Some(id) = RawId::from_hex(trace_id) else {
            return Ok(Vec::new());
        };
        let sql = format!("{SPAN_SELECT} WHERE s.trace_id = ?1 ORDER BY s.start_ns, s.span_id");
        query_spans(&self.conn, &sql, params![id])
    }

    fn spans_started(
        &self,
        window: TimeWindow,
        name: &str,
        limit: usize,
    ) -> Result<Vec<SpanRow>, ReadError> {
        // Walk spans_start in order: the `+` keeps SQLite from searching
        // spans_operation_start instead, which would sort every span of the
        // window (the report asks for whole windows).
        let sql = format!(
            "{SPAN_SELECT} WHERE s.start_ns BETWEEN ?1 AND ?2 \
             AND +s.operation_id IN (SELECT id FROM operations WHERE name = ?3) \
             ORDER BY s.start_ns, s.trace_id, s.span_id LIMIT ?4"
        );
        query_spans(
            &self.conn,
            &sql,
            params![window.from_ns, window.to_ns, name, to_limit(limit)],
        )
    }

    fn count_spans_started(&self, window: TimeWindow, name: &str) -> Result<u64, ReadError> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM span_rows WHERE start_ns BETWEEN ?1 AND ?2 \
             AND operation_id IN (SELECT id FROM operations WHERE name = ?3)",
            params![window.from_ns, window.to_ns, name],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn spans(&self, window: TimeWindow, limit: usize) -> Result<Vec<SpanRow>, ReadError> {
        let sql = format!(
            "{SPAN_SELECT} WHERE s.start_ns BETWEEN ?1 AND ?2 \
             ORDER BY s.start_ns, s.trace_id, s.span_id LIMIT ?3"
        );
        query_spans(
            &self.conn,
            &sql,
            params![window.from_ns, window.to_ns, to_limit(limit)],
        )
    }

    fn events(&self, name: &str, window: TimeWindow) -> Result<Vec<EventRow>, ReadError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE name = ?1 AND time_ns BETWEEN ?2 AND ?3 \
             ORDER BY time_ns, id"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![name, window.from_ns, window.to_ns], event_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn events_with_body(
        &self,
        needle: &str,
        window: TimeWindow,
        limit: usize,
    ) -> Result<Vec<EventRow>, ReadError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE time_ns BETWEEN ?1 AND ?2 \
             AND instr(body, ?3) > 0 ORDER BY time_ns, id LIMIT ?4"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(
            params![window.from_ns, window.to_ns, needle, to_limit(limit)],
            event_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn probe_attempts(&self, window: TimeWindow) -> Result<Vec<ProbeAttempt>, ReadError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT time_ns, target, latency_ms, outcome, http_status, error FROM probe_attempts \
             WHERE time_ns BETWEEN ?1 AND ?2 ORDER BY time_ns, id",
        )?;
        let rows = stmt.query_map(params![window.from_ns, window.to_ns], probe_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn console_snapshot_times(&self, window: TimeWindow) -> Result<Vec<i64>, ReadError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT DISTINCT snapshot_ns FROM console_tasks WHERE snapshot_ns BETWEEN ?1 AND ?2 \
             UNION SELECT DISTINCT snapshot_ns FROM console_async_ops \
             WHERE snapshot_ns BETWEEN ?1 AND ?2 ORDER BY 1",
        )?;
        let rows = stmt.query_map(params![window.from_ns, window.to_ns], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn console_snapshot(&self, snapshot_ns: i64) -> Result<ConsoleSnapshot, ReadError> {
        let mut tasks_stmt = self.conn.prepare_cached(
            "SELECT task_id, tokio_task_id, name, kind, spawn_location, fields, state, polls, \
             busy_ns, idle_ns, scheduled_ns, wakes, waker_count, last_poll_started_ns, \
             last_poll_ended_ns, warnings FROM console_tasks WHERE snapshot_ns = ?1 ORDER BY task_id",
        )?;
        let tasks = tasks_stmt
            .query_map(params![snapshot_ns], |r| {
                let warnings = json(r.get(15)?, "[]");
                Ok(ConsoleTaskRow {
                    task_id: r.get(0)?,
                    tokio_task_id: r.get(1)?,
                    name: r.get(2)?,
                    kind: r.get(3)?,
                    spawn_location: r.get(4)?,
                    fields: json(r.get(5)?, "{}"),
                    state: r.get(6)?,
                    polls: r.get(7)?,
                    busy_ns: r.get(8)?,
                    idle_ns: r.get(9)?,
                    scheduled_ns: r.get(10)?,
                    wakes: r.get(11)?,
                    waker_count: r.get(12)?,
                    last_poll_started_ns: r.get(13)?,
                    last_poll_ended_ns: r.get(14)?,
                    warnings: warnings
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|w| w.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default(),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut res_stmt = self.conn.prepare_cached(
            "SELECT resource_id, concrete_type, kind, location, attributes FROM console_resources \
             WHERE snapshot_ns = ?1 ORDER BY resource_id",
        )?;
        let resources = res_stmt
            .query_map(params![snapshot_ns], |r| {
                Ok(ConsoleResourceRow {
                    resource_id: r.get(0)?,
                    concrete_type: r.get(1)?,
                    kind: r.get(2)?,
                    location: r.get(3)?,
                    attributes: json(r.get(4)?, "{}"),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut ops_stmt = self.conn.prepare_cached(
            "SELECT async_op_id, resource_id, task_id, source, polls, busy_ns, idle_ns \
             FROM console_async_ops WHERE snapshot_ns = ?1 ORDER BY async_op_id",
        )?;
        let async_ops = ops_stmt
            .query_map(params![snapshot_ns], |r| {
                Ok(ConsoleAsyncOpRow {
                    async_op_id: r.get(0)?,
                    resource_id: r.get(1)?,
                    task_id: r.get(2)?,
                    source: r.get(3)?,
                    polls: r.get(4)?,
                    busy_ns: r.get(5)?,
                    idle_ns: r.get(6)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ConsoleSnapshot {
            snapshot_ns,
            tasks,
            resources,
            async_ops,
        })
    }
    fn services(&self) -> Result<Vec<String>, ReadError> {
        search::services(&self.conn)
    }

    fn operations(&self, service: &str) -> Result<Vec<OperationName>, ReadError> {
        search::operations(&self.conn, service)
    }

    fn find_traces(&self, query: &TraceQuery) -> Result<Vec<FoundTrace>, ReadError> {
        search::find_traces(&self.conn, query)
    }

    fn service_links(&self, window: TimeWindow) -> Result<Vec<ServiceLink>, ReadError> {
        search::service_links(&self.conn, window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SCHEMA_SQL;

    fn store() -> (tempfile::TempDir, PathBuf, Connection) {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("s.sqlite");
        let conn = Connection::open(&path).expect("create");
        conn.execute_batch("PRAGMA journal_mode = WAL;")
            .expect("wal");
        conn.execute_batch(SCHEMA_SQL).expect("schema");
        (dir, path, conn)
    }

    fn span(conn: &Connection, trace: &str, id: &str, start: i64, end: i64, incomplete: bool) {
        conn.execute(
            "INSERT INTO spans (trace_id, span_id, name, start_ns, end_ns, incomplete, attributes, received_ns) \
             VALUES (?1, ?2, 'kms.request', ?3, ?4, ?5, ?6, ?4)",
            params![trace, id, start, end, incomplete as i64, if incomplete { "{\"incomplete\":true}" } else { "not json" }],
        )
        .expect("insert");
    }

    #[test]
    fn empty_store_has_no_bounds_and_missing_files_are_errors() {
        let (dir, path, _conn) = store();
        let r = SqliteReader::open(&path).expect("open");
        assert_eq!(r.bounds().expect("bounds"), None);
        assert!(r.incomplete_spans(TimeWindow::ALL).expect("q").is_empty());
        let missing = dir.path().join("missing.sqlite");
        assert!(matches!(
            SqliteReader::open(&missing),
            Err(ReadError::Open { .. })
        ));
        assert!(!missing.exists(), "a reader must not create a store");
        let other = dir.path().join("other.sqlite");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x);")
            .unwrap();
        assert!(matches!(
            SqliteReader::open(&other),
            Err(ReadError::NotAStore { .. })
        ));
    }

    #[test]
    fn windows_bounds_and_order_follow_the_contract() {
        let (_dir, path, conn) = store();
        span(&conn, "aa", "01", 100, 200, false);
        span(&conn, "aa", "02", 150, 900, true);
        span(&conn, "bb", "03", 50, 60, false);
        span(&conn, "cc", "04", 300, 400, true);
        conn.execute(
            "INSERT INTO events (time_ns, name, attributes, received_ns) VALUES (950, 'kms.runtime', '{}', 950), (10, 'kms.runtime', '{}', 10), (500, 'other', '{}', 500)",
            [],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO probe_attempts (time_ns, target, outcome) VALUES (20, 'u', 'ok'), (30, 'u', 'weird')",
            [],
        )
        .unwrap();
        let r = SqliteReader::open(&path).expect("open");
        assert_eq!(
            r.bounds().unwrap(),
            Some(DataBounds {
                first_ns: 10,
                last_ns: 950
            })
        );
        // Snapshots whose open interval overlaps the window, oldest start first.
        let open: Vec<String> = r
            .incomplete_spans(TimeWindow::new(350, 360))
            .unwrap()
            .into_iter()
            .map(|s| s.span_id)
            .collect();
        assert_eq!(open, ["02", "04"]);
        assert_eq!(
            r.incomplete_spans(TimeWindow::new(901, 1000))
                .unwrap()
                .len(),
            0
        );
        // Bad attribute JSON reads as an empty object.
        let closed = r.spans(TimeWindow::ALL, 10).unwrap();
        assert_eq!(closed[0].span_id, "03");
        assert_eq!(closed[0].attributes, serde_json::json!({}));
        assert_eq!(r.spans(TimeWindow::ALL, 2).unwrap().len(), 2);
        assert_eq!(
            r.trace("AA").unwrap().len(),
            2,
            "trace ids are matched case-insensitively"
        );
        assert_eq!(
            r.count_spans_started(TimeWindow::new(100, 300), "kms.request")
                .unwrap(),
            3
        );
        assert_eq!(
            r.spans_started(TimeWindow::new(100, 300), "kms.request", 1)
                .unwrap()[0]
                .span_id,
            "01"
        );
        let times: Vec<i64> = r
            .events("kms.runtime", TimeWindow::ALL)
            .unwrap()
            .iter()
            .map(|e| e.time_ns)
            .collect();
        assert_eq!(times, [10, 950]);
        let probes = r.probe_attempts(TimeWindow::ALL).unwrap();
        assert_eq!(
            probes[1].outcome,
            ProbeOutcome::Other,
            "unknown outcomes read as other"
        );
    }

    #[test]
    fn the_reader_cannot_write() {
        let (_dir, path, _conn) = store();
        let r = SqliteReader::open(&path).expect("open");
        let err = r.conn.execute("DELETE FROM span_rows", []);
        assert!(err.is_err(), "a read-only connection accepted a write");
    }
}
