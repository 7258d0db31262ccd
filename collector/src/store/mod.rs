//! Durable storage in SQLite, behind small traits.
//!
//! The schema is `schema.sql` (documented for operators in `docs/schema.md`).

pub(crate) mod encoded;
mod known;
mod model;
mod reader;
mod search;
mod sqlite;
mod stage;
mod writer;

pub use encoded::EncodedBatch;
pub use model::{
    Batch, ConsoleAsyncOpRow, ConsoleResourceRow, ConsoleSnapshot, ConsoleTaskRow, EventRow,
    MetricSample, ProbeAttempt, ProbeOutcome, SpanRow,
};

pub use reader::{DataBounds, ReadError, Reader, SqliteReader, TimeWindow};
pub use search::{FoundTrace, OperationName, ServiceLink, TraceQuery};
pub use sqlite::{count_rows, SqliteStore, SCHEMA_VERSION};
pub use stage::{
    PendingWrite, StoreHandle, StoreStage, SubmitError, DEFAULT_MAX_GROUP, DEFAULT_QUEUE_CAPACITY,
};
pub use writer::{Record, Retention, RetentionSummary, StoreError, Writer};

/// The schema, applied when a store is opened.
pub const SCHEMA_SQL: &str = include_str!("schema.sql");
