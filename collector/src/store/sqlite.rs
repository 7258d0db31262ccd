//! The SQLite store: one file, WAL mode, the schema of `schema.sql`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Transaction};

use super::encoded::{EncodedBatch, EncodedSpan};
use super::known::KnownRows;
use super::writer::{Record, Retention, RetentionSummary, StoreError, Writer};
use super::{ConsoleSnapshot, ProbeAttempt, SCHEMA_SQL};

/// `PRAGMA user_version` this collector writes.
pub const SCHEMA_VERSION: i64 = 3;

/// Tables that retention trims, each with the column that says how old a row is.
const AGED_TABLES: &[(&str, &str)] = &[
    ("span_rows", "received_ns"),
    ("events", "received_ns"),
    ("metric_samples", "received_ns"),
    ("probe_attempts", "time_ns"),
    ("console_tasks", "snapshot_ns"),
    ("console_resources", "snapshot_ns"),
    ("console_async_ops", "snapshot_ns"),
    ("collector_stats", "time_ns"),
];

/// Parameters of one span row.
const SPAN_PARAMS: usize = 15;
/// Rows per multi-row span insert (15 parameters each).
const SPANS_PER_INSERT: usize = 32;

/// The upsert of `n` span rows. The merge rule of docs/wire-format.md: only
/// a stored snapshot can be replaced, by the closed span or by a newer
/// snapshot. SQLite applies it row by row, also between rows of one statement.
fn insert_spans_sql(n: usize) -> String {
    let row = format!("({})", vec!["?"; SPAN_PARAMS].join(", "));
    format!(
        "INSERT INTO span_rows (trace_id, span_id, parent_span_id, operation_id, kind,
                   resource_id, start_ns, end_ns, status_code, status_message, incomplete,
                   snapshot_seq, attributes, events, received_ns)
VALUES {}
ON CONFLICT (trace_id, span_id) DO UPDATE SET
    parent_span_id = excluded.parent_span_id, operation_id = excluded.operation_id,
    kind = excluded.kind, resource_id = excluded.resource_id,
    start_ns = excluded.start_ns, end_ns = excluded.end_ns, status_code = excluded.status_code,
    status_message = excluded.status_message, incomplete = excluded.incomplete,
    snapshot_seq = excluded.snapshot_seq, attributes = excluded.attributes,
    events = excluded.events, received_ns = excluded.received_ns
WHERE span_rows.incomplete = 1
  AND (excluded.incomplete = 0
       OR (COALESCE(excluded.snapshot_seq, 0), excluded.end_ns)
          > (COALESCE(span_rows.snapshot_seq, 0), span_rows.end_ns))",
        vec![row; n].join(",\n       ")
    )
}

static INSERT_SPAN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| insert_spans_sql(1));
static INSERT_SPANS_CHUNK: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| insert_spans_sql(SPANS_PER_INSERT));

const INSERT_EVENT: &str = "\
INSERT INTO events (time_ns, name, severity, trace_id, span_id, service, body, attributes,
                    received_ns, dedup_key)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
ON CONFLICT (dedup_key) DO NOTHING";

const INSERT_METRIC: &str = "\
INSERT INTO metric_samples (time_ns, name, value, attributes, service, received_ns, dedup_key)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
ON CONFLICT (dedup_key) DO NOTHING";

const INSERT_PROBE: &str = "\
INSERT INTO probe_attempts (time_ns, target, latency_ms, outcome, http_status, error)
VALUES (?1, ?2, ?3, ?4, ?5, ?6)
ON CONFLICT (time_ns, target) DO NOTHING";

const INSERT_TASK: &str = "\
INSERT OR REPLACE INTO console_tasks (snapshot_ns, task_id, tokio_task_id, name, kind,
    spawn_location, fields, state, polls, busy_ns, idle_ns, scheduled_ns, wakes, waker_count,
    last_poll_started_ns, last_poll_ended_ns, warnings)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)";

const INSERT_RESOURCE: &str = "\
INSERT OR REPLACE INTO console_resources (snapshot_ns, resource_id, concrete_type, kind, location,
    attributes)
VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

const INSERT_ASYNC_OP: &str = "\
INSERT OR REPLACE INTO console_async_ops (snapshot_ns, async_op_id, resource_id, task_id, source,
    polls, busy_ns, idle_ns)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

const INSERT_STAT: &str =
    "INSERT OR REPLACE INTO collector_stats (time_ns, name, value) VALUES (?1, ?2, ?3)";

/// The collector's SQLite database, open for writing.
///
/// Opening creates the file and the schema if needed, and sets WAL mode,
/// `synchronous = FULL` and incremental auto-vacuum. Readers (`sqlite3`, the
/// report) may open the same file at the same time.
///
/// # Examples
///
/// ```
/// use kms_collector::store::{Batch, Record, SqliteStore, Writer};
/// let dir = tempfile::tempdir()?;
/// let mut store = SqliteStore::open(dir.path().join("kms-diag.sqlite"))?;
/// store.write(&[Record::Batch(Batch::default())])?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    known: KnownRows,
    // Holds its own connection: stops (and joins) when the store drops.
    _checkpointer: Checkpointer,
}

/// Runs passive WAL checkpoints on its own connection and OS thread
/// (`kms-checkpoint`), so that the store thread's commits only append to
/// the WAL and never copy pages back into the database file themselves.
#[derive(Debug)]
struct Checkpointer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    const EVERY: Duration = Duration::from_millis(200);

    fn spawn(path: &Path) -> Result<Self, StoreError> {
        let conn =
            Connection::open(path).map_err(StoreError::sqlite("opening the checkpointer"))?;
        conn.busy_timeout(SqliteStore::BUSY_TIMEOUT)
            .map_err(StoreError::sqlite("opening the checkpointer"))?;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kms-checkpoint".into())
            .spawn(move || {
                let (lock, cv) = &*flag;
                let Ok(mut stopped) = lock.lock() else { return };
                loop {
                    match cv.wait_timeout(stopped, Self::EVERY) {
                        Ok((guard, _)) => stopped = guard,
                        Err(_) => return,
                    }
                    if *stopped {
                        return;
                    }
                    // PASSIVE never waits for the writer: it copies what it
                    // can and leaves the rest for the next round.
                    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)") {
                        tracing::debug!(error = %e, "WAL checkpoint failed; retrying.");
                    }
                }
            })
            .map_err(|source| StoreError::Io {
                op: "starting the checkpoint thread",
                source,
            })?;
        Ok(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        if let Ok(mut stopped) = lock.lock() {
            *stopped = true;
        }
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl SqliteStore {
    /// How long a write waits for another connection's lock before failing.
    pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

    /// Opens (creating if needed) the database at `path`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] when the file cannot be opened or the schema
    /// applied; [`StoreError::SchemaTooOld`] or [`StoreError::SchemaTooNew`]
    /// when another version of the collector made it (the file is left as
    /// it was).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(StoreError::sqlite("opening the database"))?;
        conn.busy_timeout(Self::BUSY_TIMEOUT)
            .map_err(StoreError::sqlite("setting the busy timeout"))?;
        let found: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(StoreError::sqlite("reading the schema version"))?;
        // 0: a new file (SQLite's default).
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found != 0 && found < SCHEMA_VERSION {
            return Err(StoreError::SchemaTooOld {
                found,
                expected: SCHEMA_VERSION,
            });
        }
        // auto_vacuum only takes effect before the first table is created, so
        // it comes before the schema; it lets size retention give pages back.
        //
        // Durability: an export is acknowledged once its transaction commits,
        // and the client then forgets it. In WAL mode `synchronous = NORMAL`
        // survives a crash of this process but may lose the last commits on a
        // power loss or host crash; `FULL` syncs the WAL on every commit so an
        // acknowledged export survives those too. The store stage groups many
        // exports into one transaction, so the one fsync per commit is
        // amortised (see the ingest benchmark), and FULL is what the
        // acknowledgement promises.
        conn.execute_batch(
            "PRAGMA auto_vacuum = INCREMENTAL;
             PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;",
        )
        .map_err(StoreError::sqlite("setting the journal mode"))?;
        // Ingest inserts into several indexes at random places (span ids are
        // random): a page cache of 64 MiB instead of SQLite's 2 MiB keeps
        // their hot pages in memory. Checkpoints run on their own thread
        // (`Checkpointer`); the writer checkpoints itself only if the WAL
        // reaches 64 MiB anyway (the checkpointer is stuck or too slow).
        conn.execute_batch(
            "PRAGMA cache_size = -65536;
             PRAGMA wal_autocheckpoint = 16384;
             PRAGMA temp_store = MEMORY;",
        )
        .map_err(StoreError::sqlite("setting the journal mode"))?;
        conn.execute_batch(SCHEMA_SQL)
            .map_err(StoreError::sqlite("applying the schema"))?;
        conn.set_prepared_statement_cache_capacity(32);
        let checkpointer = Checkpointer::spawn(&path)?;
        Ok(SqliteStore {
            conn,
            path,
            known: KnownRows::default(),
            _checkpointer: checkpointer,
        })
    }

    /// The file this store writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of data in the file: pages in use times the page size (free
    /// pages and the WAL not counted).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] when the pragmas cannot be read.
    pub fn data_bytes(&self) -> Result<u64, StoreError> {
        let op = "measuring the database size";
        let pages: i64 = self
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .map_err(StoreError::sqlite(op))?;
        let free: i64 = self
            .conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))
            .map_err(StoreError::sqlite(op))?;
        let size: i64 = self
            .conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(StoreError::sqlite(op))?;
        Ok(u64::try_from((pages - free).max(0) * size).unwrap_or(0))
    }

    /// The open connection, for queries in tests and tools.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Oldest and newest row time over all aged tables, if any row exists.
    fn time_range(&self) -> Result<Option<(i64, i64)>, StoreError> {
        let mut range: Option<(i64, i64)> = None;
        for (table, col) in AGED_TABLES {
            let sql = format!("SELECT MIN({col}), MAX({col}) FROM {table}");
            let (lo, hi): (Option<i64>, Option<i64>) = self
                .conn
                .query_row(&sql, [], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(StoreError::sqlite("finding the oldest rows"))?;
            if let (Some(lo), Some(hi)) = (lo, hi) {
                range = Some(match range {
                    None => (lo, hi),
                    Some((a, b)) => (a.min(lo), b.max(hi)),
                });
            }
        }
        Ok(range)
    }

    /// Deletes every row older than `cutoff_ns` in one transaction.
    fn delete_before(&mut self, cutoff_ns: i64) -> Result<u64, StoreError> {
        let op = "deleting old rows";
        let tx = self.conn.transaction().map_err(StoreError::sqlite(op))?;
        let mut deleted = 0u64;
        for (table, col) in AGED_TABLES {
            let n = tx
                .execute(
                    &format!("DELETE FROM {table} WHERE {col} < ?1"),
                    [cutoff_ns],
                )
                .map_err(StoreError::sqlite(op))?;
            deleted += n as u64;
        }
        tx.commit().map_err(StoreError::sqlite(op))?;
        Ok(deleted)
    }
}

impl Writer for SqliteStore {
    fn write(&mut self, records: &[Record]) -> Result<(), StoreError> {
        let result = write_records(&mut self.conn, &mut self.known, records);
        self.known.settle(result.is_ok());
        result
    }

    fn apply_retention(
        &mut self,
        retention: &Retention,
        now_ns: i64,
    ) -> Result<RetentionSummary, StoreError> {
        let mut summary = RetentionSummary::default();
        if let Some(max_age) = retention.max_age {
            let age = i64::try_from(max_age.as_nanos()).unwrap_or(i64::MAX);
            let cutoff = now_ns.saturating_sub(age);
            let n = self.delete_before(cutoff)?;
            if n > 0 {
                summary.rows_deleted += n;
                summary.cutoff_ns = cutoff;
            }
        }
        if let Some(max_bytes) = retention.max_bytes {
            // Cut the oldest tenth of the stored time span, all tables alike,
            // until the data fit: the report then sees one consistent window.
            while self.data_bytes()? > max_bytes {
                let Some((oldest, newest)) = self.time_range()? else {
                    break;
                };
                let step = ((newest - oldest) / 10).max(1);
                let cutoff = oldest.saturating_add(step);
                summary.rows_deleted += self.delete_before(cutoff)?;
                summary.cutoff_ns = summary.cutoff_ns.max(cutoff);
            }
        }
        if summary.rows_deleted > 0 {
            self.conn
                .execute_batch("PRAGMA incremental_vacuum")
                .map_err(StoreError::sqlite("vacuuming freed pages"))?;
        }
        summary.bytes_after = self.data_bytes()?;
        Ok(summary)
    }
}

/// One transaction holding `records` (the [`Writer::write`] contract).
fn write_records(
    conn: &mut Connection,
    known: &mut KnownRows,
    records: &[Record],
) -> Result<(), StoreError> {
    let tx = conn
        .transaction()
        .map_err(StoreError::sqlite("starting a transaction"))?;
    for record in records {
        match record {
            Record::Batch(batch) => write_encoded(&tx, known, &EncodedBatch::encode(batch)?)?,
            Record::Encoded(batch) => write_encoded(&tx, known, batch)?,
            Record::Probe(attempt) => write_probe(&tx, attempt)?,
            Record::Console(snapshot) => write_console(&tx, snapshot)?,
            Record::Stats { time_ns, values } => {
                let op = "writing collector stats";
                let mut stmt = tx
                    .prepare_cached(INSERT_STAT)
                    .map_err(StoreError::sqlite(op))?;
                for (name, value) in values {
                    stmt.execute(params![time_ns, name, value])
                        .map_err(StoreError::sqlite(op))?;
                }
            }
        }
    }
    tx.commit().map_err(StoreError::sqlite("committing"))
}

/// The parameters of one span row, in `insert_spans_sql` order.
fn span_params<'a>(
    s: &'a EncodedSpan,
    (resource_id, operation_id): &'a (i64, i64),
) -> [&'a dyn rusqlite::ToSql; SPAN_PARAMS] {
    [
        &s.trace_id,
        &s.span_id,
        &s.parent_span_id,
        operation_id,
        &s.kind,
        resource_id,
        &s.start_ns,
        &s.end_ns,
        &s.status_code,
        &s.status_message,
        &s.incomplete,
        &s.snapshot_seq,
        &s.attributes,
        &s.events,
        &s.received_ns,
    ]
}

fn write_encoded(
    tx: &Transaction<'_>,
    known: &mut KnownRows,
    batch: &EncodedBatch,
) -> Result<(), StoreError> {
    if !batch.spans.is_empty() {
        let op = "writing spans";
        let ids = batch
            .spans
            .iter()
            .map(|s| known.ids(tx, s))
            .collect::<Result<Vec<(i64, i64)>, _>>()?;
        // Many rows per statement: one step per chunk instead of per span.
        let full = batch.spans.len() / SPANS_PER_INSERT * SPANS_PER_INSERT;
        if full > 0 {
            let mut stmt = tx
                .prepare_cached(&INSERT_SPANS_CHUNK)
                .map_err(StoreError::sqlite(op))?;
            let mut values: Vec<&dyn rusqlite::ToSql> =
                Vec::with_capacity(SPANS_PER_INSERT * SPAN_PARAMS);
            for (chunk, ids) in batch.spans[..full]
                .chunks_exact(SPANS_PER_INSERT)
                .zip(ids.chunks_exact(SPANS_PER_INSERT))
            {
                values.clear();
                values.extend(chunk.iter().zip(ids).flat_map(|(s, id)| span_params(s, id)));
                stmt.execute(values.as_slice())
                    .map_err(StoreError::sqlite(op))?;
            }
        }
        if full < batch.spans.len() {
            let mut stmt = tx
                .prepare_cached(&INSERT_SPAN)
                .map_err(StoreError::sqlite(op))?;
            for (s, id) in batch.spans[full..].iter().zip(&ids[full..]) {
                stmt.execute(span_params(s, id).as_slice())
                    .map_err(StoreError::sqlite(op))?;
            }
        }
    }
    if !batch.events.is_empty() {
        let op = "writing events";
        let mut stmt = tx
            .prepare_cached(INSERT_EVENT)
            .map_err(StoreError::sqlite(op))?;
        for e in &batch.events {
            stmt.execute(params![
                e.time_ns,
                e.name,
                e.severity,
                e.trace_id,
                e.span_id,
                e.service.as_deref(),
                e.body,
                e.attributes,
                e.received_ns,
                e.dedup_key,
            ])
            .map_err(StoreError::sqlite(op))?;
        }
    }
    if !batch.metrics.is_empty() {
        let op = "writing metric samples";
        let mut stmt = tx
            .prepare_cached(INSERT_METRIC)
            .map_err(StoreError::sqlite(op))?;
        for m in &batch.metrics {
            stmt.execute(params![
                m.time_ns,
                m.name,
                m.value,
                m.attributes,
                m.service.as_deref(),
                m.received_ns,
                m.dedup_key
            ])
            .map_err(StoreError::sqlite(op))?;
        }
    }
    Ok(())
}

fn json_text(value: &serde_json::Value) -> String {
    // Serialising a `Value` cannot fail (its map keys are strings).
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

fn write_probe(tx: &Transaction<'_>, a: &ProbeAttempt) -> Result<(), StoreError> {
    let op = "writing a probe attempt";
    tx.prepare_cached(INSERT_PROBE)
        .and_then(|mut stmt| {
            stmt.execute(params![
                a.time_ns,
                a.target,
                a.latency_ms,
                a.outcome.as_str(),
                a.http_status,
                a.error
            ])
        })
        .map_err(StoreError::sqlite(op))?;
    Ok(())
}

fn write_console(tx: &Transaction<'_>, snap: &ConsoleSnapshot) -> Result<(), StoreError> {
    let op = "writing a console snapshot";
    let at = snap.snapshot_ns;
    let mut stmt = tx
        .prepare_cached(INSERT_TASK)
        .map_err(StoreError::sqlite(op))?;
    for t in &snap.tasks {
        let warnings = serde_json::to_string(&t.warnings).unwrap_or_else(|_| "[]".to_owned());
        stmt.execute(params![
            at,
            t.task_id,
            t.tokio_task_id,
            t.name,
            t.kind,
            t.spawn_location,
            json_text(&t.fields),
            t.state,
            t.polls,
            t.busy_ns,
            t.idle_ns,
            t.scheduled_ns,
            t.wakes,
            t.waker_count,
            t.last_poll_started_ns,
            t.last_poll_ended_ns,
            warnings,
        ])
        .map_err(StoreError::sqlite(op))?;
    }
    let mut stmt = tx
        .prepare_cached(INSERT_RESOURCE)
        .map_err(StoreError::sqlite(op))?;
    for r in &snap.resources {
        stmt.execute(params![
            at,
            r.resource_id,
            r.concrete_type,
            r.kind,
            r.location,
            json_text(&r.attributes)
        ])
        .map_err(StoreError::sqlite(op))?;
    }
    let mut stmt = tx
        .prepare_cached(INSERT_ASYNC_OP)
        .map_err(StoreError::sqlite(op))?;
    for o in &snap.async_ops {
        stmt.execute(params![
            at,
            o.async_op_id,
            o.resource_id,
            o.task_id,
            o.source,
            o.polls,
            o.busy_ns,
            o.idle_ns
        ])
        .map_err(StoreError::sqlite(op))?;
    }
    Ok(())
}

/// Counts rows of a table; for tests and tools.
///
/// # Errors
///
/// [`StoreError::Sqlite`] when the query fails (e.g. no such table).
pub fn count_rows(conn: &Connection, table: &str) -> Result<i64, StoreError> {
    conn.query_row(&format!("SELECT COUNT(*) FROM \"{table}\""), [], |r| {
        r.get(0)
    })
    .optional()
    .map(|n| n.unwrap_or(0))
    .map_err(StoreError::sqlite("counting rows"))
}
