#![doc = include_str!("../README.md")]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

mod access;
mod builder;
#[cfg(feature = "console")]
mod console;
#[cfg(feature = "deadlock-detection")]
mod deadlock;
pub mod env;
mod error;
mod event;
#[cfg(feature = "otlp")]
mod export;
mod guard;
mod logs;
#[cfg(feature = "runtime-metrics")]
mod metrics;
#[cfg(feature = "process-facts")]
mod process;
#[cfg(any(feature = "console", feature = "otlp"))]
mod quiet_thread;
mod rpc;
mod runtime;
mod sink;
pub(crate) mod spans;
#[cfg(any(feature = "taskdump", feature = "taskdump-cfg"))]
mod taskdump;
#[cfg(feature = "watchdog")]
mod watchdog;

pub use access::{ConsoleBind, ConsoleBindParseError, OtlpHeaders};
pub use builder::{Builder, DiagLayer, Settings};
pub use error::InitError;
pub use event::{AttrValue, DiagEvent, Severity};
pub use guard::{DiagGuard, ExportStats};
pub use rpc::{
    monitor_rpc, outbound, outbound_result, record_status, request_span, HttpProtocol,
    OutboundCall, Peer, RequestInfo,
};
pub use runtime::{runtime_builder, RuntimeLimits, WORKER_THREAD_PREFIX};
pub use sink::EventSink;
