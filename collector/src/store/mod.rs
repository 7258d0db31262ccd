//! Durable storage in SQLite, behind small traits.
//!
//! The schema is `schema.sql` (documented for operators in `docs/schema.md`).

mod model;

pub use model::{
    Batch, ConsoleAsyncOpRow, ConsoleResourceRow, ConsoleSnapshot, ConsoleTaskRow, EventRow,
    MetricSample, ProbeAttempt, ProbeOutcome, SpanRow,
};

/// The schema, applied when a store is opened.
pub const SCHEMA_SQL: &str = include_str!("schema.sql");
