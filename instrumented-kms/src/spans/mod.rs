//! Span tracking: a tracing [`Layer`](tracing_subscriber::Layer) of ours that
//! gives every span OpenTelemetry ids, keeps the set of open spans (for the
//! open-span reporter) and, per OS thread, the stack of entered spans (for the
//! watchdog, which names the span a stuck worker is in).
//!
//! Closed spans are handed to a [`ClosedSpanSink`] (the export queue when OTLP
//! is on); converting them to OTLP protobuf happens later, on the export
//! thread, so the app's threads pay only for recording.

mod ids;
mod layer;
// Without `otlp`, closed spans are discarded and some fields go unread.
#[cfg_attr(not(feature = "otlp"), allow(dead_code))]
mod record;
mod redact;
mod registry;
#[cfg(feature = "otlp")]
pub(crate) mod reporter;
mod sampler;

pub(crate) use layer::SpanLayer;
#[allow(unused_imports)]
pub(crate) use record::{unix_nanos, ClosedSpan, SpanKind, SpanRecord, SpanStatus, Value};
pub(crate) use redact::split_url;
#[allow(unused_imports)]
pub(crate) use registry::OpenSpans;
pub(crate) use sampler::Sampler;

/// Name of the request span opened by [`request_span`](crate::request_span).
pub(crate) const REQUEST_SPAN: &str = "kms.request";

/// What the watchdog needs to know about the span a thread is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SpanRef {
    /// Span name, e.g. `kms.request`.
    pub(crate) name: String,
    /// OpenTelemetry trace id.
    pub(crate) trace_id: [u8; 16],
    /// OpenTelemetry span id.
    pub(crate) span_id: [u8; 8],
}

/// The innermost span entered on the OS thread `tid` (from `gettid`), if the
/// span layer is installed and that thread is inside a tracked span.
///
/// Safe to call from any thread (the watchdog's); takes two short locks.
#[allow(dead_code)]
pub(crate) fn current_span_on_thread(tid: i32) -> Option<SpanRef> {
    registry::current_span_on_thread(tid)
}

/// Where the span layer hands spans when they close.
pub(crate) trait ClosedSpanSink: Send + Sync + 'static {
    /// Takes one closed span. Must not block.
    fn closed(&self, span: ClosedSpan);

    /// Counts an ordinary span not exported because its trace was not
    /// sampled (the rate limit was reached).
    fn sampled_out(&self) {}
}

/// A sink that discards closed spans (span tracking for the watchdog only).
#[derive(Debug)]
pub(crate) struct DiscardClosed;

impl ClosedSpanSink for DiscardClosed {
    fn closed(&self, _span: ClosedSpan) {}
}
