//! Jaeger's remote-storage API served from our store
//! (`serve --jaeger-storage 127.0.0.1:17271`), so that a stock Jaeger v2
//! with a `grpc` storage backend shows every trace we hold, stuck requests
//! included.
//!
//! Forwarding (`--forward`) cannot show a stuck request: Jaeger never
//! replaces a span it was sent, so open-span snapshots are not forwarded.
//! Here Jaeger reads through us instead, so it sees what the store holds at
//! the moment of the query: a stuck span as its newest snapshot (marked
//! `incomplete=true`, `error=true`, `kms.open.age_ms`, its duration the time
//! open so far), replaced by the closed span once it ends.
//!
//! Served on one port (tonic, HTTP/2, plain text, meant for loopback):
//! - `jaeger.storage.v2.TraceReader`: `GetTraces`, `GetServices`,
//!   `GetOperations`, `FindTraces`, `FindTraceIDs`;
//! - `jaeger.storage.v2.DependencyReader`: `GetDependencies`;
//! - OTLP `TraceService`: spans Jaeger writes (its `jaeger_storage_exporter`)
//!   go through the same ingest path as the OTLP receivers.
//!
//! Every read goes through the [`Reader`](crate::store::Reader) trait on its
//! own read-only connection, off the async runtime.

mod convert;
mod proto;
mod service;

pub(crate) use service::serve;
pub use service::JaegerStorageError;

/// Default address of `serve --jaeger-storage`: Jaeger's own default for its
/// remote-storage endpoint, on loopback.
pub const DEFAULT_ADDR: &str = "127.0.0.1:17271";

/// Generated client types, for tests and tools that talk to a remote
/// storage server as Jaeger does.
pub mod client {
    /// `AnyValue`'s oneof.
    pub use super::proto::any_value::Value as AnyValueKind;
    pub use super::proto::dependency_reader_client::DependencyReaderClient;
    pub use super::proto::trace_reader_client::TraceReaderClient;
    pub use super::proto::{
        AnyValue, FindTracesRequest, GetDependenciesRequest, GetOperationsRequest,
        GetServicesRequest, GetTraceParams, GetTracesRequest, KeyValue, TraceQueryParameters,
    };
}
