//! kms-collector: receive, store, diagnose. Filled in by issue #3.
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

pub mod analyse;
pub mod console;
pub mod export;
pub mod forward;
pub mod jaeger_storage;
pub mod probe;
pub mod receive;
pub mod report;
pub mod serve;
pub mod store;
