//! OTLP export on its own named OS thread.
//!
//! App threads only push into a bounded [`ExportQueue`] (a mutex-protected
//! pair of lanes, no allocation beyond the item, never a wait). The
//! `kms-diag-export` thread owns a small current-thread tokio runtime and a
//! tonic client; it encodes spans and events to OTLP protobuf and sends them
//! to the collector. Because nothing here runs on the app's runtime, export
//! keeps working when every app worker is blocked.
//!
//! Two lanes: the **ordinary** lane (closed spans that are quick and fine,
//! `Info` samples) drops and counts when full; the **priority** lane
//! (open-span snapshots, spans that were slow, failed or reported open, and
//! `Warn`/`Error` events) is larger, is always drained first, and its items
//! are retried when an export fails. Drops are reported to the collector as
//! a `kms.export_drops` event once export succeeds again.

pub(crate) mod encode;
mod queue;
mod thread;
mod transport;

pub(crate) use queue::{ExportQueue, Item};
pub(crate) use thread::{spawn, ExportConfig, ExportHandle};
pub(crate) use transport::endpoint;
