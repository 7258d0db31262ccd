//! instrumented-kms: see inside a dstack KMS's tokio runtime.
//!
//! Skeleton: the helpers working on issue #2 fill this in.
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

mod event;
mod sink;
pub(crate) mod spans;

pub use event::{AttrValue, DiagEvent, Severity};
pub use sink::EventSink;
