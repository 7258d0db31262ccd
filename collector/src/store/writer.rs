//! The write side of the store: what a writer promises and what it takes.

use std::time::Duration;

use super::{Batch, ConsoleSnapshot, EncodedBatch, ProbeAttempt};

/// One thing to store. A slice of records is written in one transaction.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Record {
    /// What one OTLP export request decoded into.
    Batch(Batch),
    /// The same, already encoded for storage (what the receivers send).
    Encoded(EncodedBatch),
    /// One GetMeta probe attempt.
    Probe(ProbeAttempt),
    /// One tokio-console snapshot.
    Console(ConsoleSnapshot),
    /// The collector's own counters at one instant (`collector_stats`).
    Stats {
        /// When the counters were read.
        time_ns: i64,
        /// Counter name and value, e.g. `("spans_received", 512)`.
        values: Vec<(String, i64)>,
    },
}

/// How much to keep. A `None` limit is not enforced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Rows older than this (by the time they were received or taken) are deleted.
    pub max_age: Option<Duration>,
    /// When the data in the file exceed this many bytes, the oldest rows of
    /// every table are deleted, one time slice at a time, until they fit.
    pub max_bytes: Option<u64>,
}

/// What one retention pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionSummary {
    /// Rows deleted, all tables together.
    pub rows_deleted: u64,
    /// Every row received (or taken) before this time is gone; 0 when nothing was deleted.
    pub cutoff_ns: i64,
    /// Bytes of data in the file after the pass.
    pub bytes_after: u64,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed while doing `op`.
    #[error("sqlite failed while {op}: {source}")]
    Sqlite {
        /// What the store was doing, e.g. "writing spans".
        op: &'static str,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// An operating-system call failed while doing `op`.
    #[error("{op}: {source}")]
    Io {
        /// What the store was doing.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The database file was made by a newer collector.
    #[error("database schema version {found} is newer than this collector's {supported}")]
    SchemaTooNew {
        /// `PRAGMA user_version` of the file.
        found: i64,
        /// The version this collector writes.
        supported: i64,
    },
    /// The database file was made by an older collector, whose schema this
    /// one neither reads nor writes. Open it with that collector (its
    /// `report` and `export` still work), or give this one another `--db`.
    #[error(
        "database schema version {found} was written by an older kms-collector; this one \
         reads and writes version {expected} only (read the file with the collector that \
         wrote it, or start a new store with another --db)"
    )]
    SchemaTooOld {
        /// `PRAGMA user_version` of the file.
        found: i64,
        /// The version this collector writes.
        expected: i64,
    },
    /// A hand-made [`SpanRow`](super::SpanRow) has a trace, span or parent
    /// id that is not hex; nothing of the write is stored.
    #[error("span id {id:?} is not hex (an even number of at most 32 hex digits)")]
    InvalidId {
        /// The id as given.
        id: String,
    },
    /// The store stage has shut down; nothing more can be written.
    #[error("the store stage has shut down")]
    Closed,
}

impl StoreError {
    pub(crate) fn sqlite(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
        move |source| StoreError::Sqlite { op, source }
    }
}

/// Durable, idempotent storage of what the collector receives.
///
/// # Contract
///
/// * **Atomic and durable when `Ok` returns.** [`Writer::write`] stores all of
///   its records in one transaction; when it returns `Ok`, they are committed
///   and survive a crash of the collector process (and, with the SQLite store,
///   of the host: it syncs the WAL on every commit). When it returns `Err`,
///   none of them are stored. The receiver acknowledges an export only after
///   this `Ok`.
/// * **Idempotent.** Writing the same records again (a client retrying an
///   export whose acknowledgement it lost) stores them once: spans are keyed by
///   `(trace_id, span_id)`, events and metric samples by a hash of their content
///   (`dedup_key`), probe attempts by `(time_ns, target)`, console rows by
///   `(snapshot_ns, id)`, stats by `(time_ns, name)`.
/// * **Merge rule for spans** (docs/wire-format.md): a closed span
///   (`incomplete = false`) replaces an open-span snapshot of the same id; a
///   snapshot never replaces a closed span; a snapshot replaces an older
///   snapshot (higher `snapshot_seq`, then later `end_ns`). The result does not
///   depend on the order in which the versions arrive.
///
/// # What a reader may assume
///
/// * A reader sees whole transactions: all of an export or none of it.
/// * At most one row per span id, and it is the best version received so far:
///   once a span's closed version is stored, a reader never sees a snapshot of
///   it again.
/// * Rows may disappear only through [`Writer::apply_retention`], oldest first:
///   after a pass with cutoff `t`, no row older than `t` remains and no row
///   newer than `t` was removed.
pub trait Writer {
    /// Stores `records` in one transaction (see the contract above).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] when the transaction could not be committed;
    /// nothing of `records` is stored then.
    fn write(&mut self, records: &[Record]) -> Result<(), StoreError>;

    /// Deletes what `retention` says is too old or too much, oldest first.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`] when the deletion failed; the store is unchanged.
    fn apply_retention(
        &mut self,
        retention: &Retention,
        now_ns: i64,
    ) -> Result<RetentionSummary, StoreError>;
}
