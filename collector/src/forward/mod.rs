//! The forward stage: everything received is sent on as OTLP/gRPC to
//! `--forward` (e.g. a Jaeger v2 all-in-one), from a bounded queue with
//! retries and backoff.
//!
//! Forwarding never slows ingest: [`Forwarder::offer`] never waits; when the
//! queue is full the request is dropped and counted. Open-span snapshots
//! (`incomplete = true`) are not forwarded: a tracing backend such as Jaeger
//! cannot replace a span it was sent, so it gets only the closed span
//! (docs/wire-format.md). The store keeps the snapshots.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::receive::convert::span_is_snapshot;

/// One received export request, to forward.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ForwardItem {
    /// Spans (snapshots are removed before sending).
    Traces(ExportTraceServiceRequest),
    /// Log records.
    Logs(ExportLogsServiceRequest),
    /// Metrics.
    Metrics(ExportMetricsServiceRequest),
}

/// How the forwarder queues and retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardConfig {
    endpoint: String,
    queue: usize,
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    timeout: Duration,
}

impl ForwardConfig {
    /// Requests waiting to be forwarded, at most.
    pub const DEFAULT_QUEUE: usize = 1024;
    /// Tries per request, the first included.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
    /// Wait before the first retry; doubles on each retry.
    pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(200);
    /// Longest wait between retries.
    pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5);
    /// Deadline of one export call (and of connecting).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Forwarding to `endpoint`, an OTLP/gRPC URL such as `http://127.0.0.1:14317`.
    pub fn new(endpoint: impl Into<String>) -> Self {
        ForwardConfig {
            endpoint: endpoint.into(),
            queue: Self::DEFAULT_QUEUE,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            initial_backoff: Self::DEFAULT_INITIAL_BACKOFF,
            max_backoff: Self::DEFAULT_MAX_BACKOFF,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    /// Queue length (default [`Self::DEFAULT_QUEUE`]).
    pub fn queue(mut self, n: usize) -> Self {
        self.queue = n.max(1);
        self
    }

    /// Tries per request (default [`Self::DEFAULT_MAX_ATTEMPTS`]).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// First retry delay (default [`Self::DEFAULT_INITIAL_BACKOFF`]).
    pub fn initial_backoff(mut self, d: Duration) -> Self {
        self.initial_backoff = d;
        self
    }

    /// Longest retry delay (default [`Self::DEFAULT_MAX_BACKOFF`]).
    pub fn max_backoff(mut self, d: Duration) -> Self {
        self.max_backoff = d;
        self
    }

    /// Deadline of one call (default [`Self::DEFAULT_TIMEOUT`]).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }
}

/// Why the forwarder could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// The `--forward` URL is not a valid gRPC endpoint.
    #[error("invalid forward endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The URL given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The forwarder's counters, since start.
#[derive(Debug, Default)]
pub struct ForwardStats {
    requests_forwarded: AtomicU64,
    spans_forwarded: AtomicU64,
    requests_dropped: AtomicU64,
    snapshots_skipped: AtomicU64,
    retries: AtomicU64,
}

/// The forwarder's counters at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ForwardCounts {
    /// Requests the destination accepted.
    pub requests_forwarded: u64,
    /// Spans in those requests.
    pub spans_forwarded: u64,
    /// Requests given up on: queue full, or every attempt failed.
    pub requests_dropped: u64,
    /// Open-span snapshots not forwarded (by design).
    pub snapshots_skipped: u64,
    /// Retries made.
    pub retries: u64,
}

impl ForwardCounts {
    /// The counts as `(name, value)` pairs, the names stored in `collector_stats`.
    pub fn pairs(&self) -> Vec<(String, i64)> {
        let v = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
        [
            ("forward.requests_forwarded", self.requests_forwarded),
            ("forward.spans_forwarded", self.spans_forwarded),
            ("forward.requests_dropped", self.requests_dropped),
            ("forward.snapshots_skipped", self.snapshots_skipped),
            ("forward.retries", self.retries),
        ]
        .into_iter()
        .map(|(k, x)| (k.to_owned(), v(x)))
        .collect()
    }
}

impl ForwardStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> ForwardCounts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ForwardCounts {
            requests_forwarded: g(&self.requests_forwarded),
            spans_forwarded: g(&self.spans_forwarded),
            requests_dropped: g(&self.requests_dropped),
            snapshots_skipped: g(&self.snapshots_skipped),
            retries: g(&self.retries),
        }
    }
}

/// The sending side of the forward queue; cheap to clone.
#[derive(Debug, Clone)]
pub struct Forwarder {
    tx: mpsc::Sender<ForwardItem>,
    stats: Arc<ForwardStats>,
}

impl Forwarder {
    /// Starts the forwarding task on the current tokio runtime. It connects
    /// lazily and reconnects by itself; it ends when every [`Forwarder`] is
    /// dropped and the queue is drained.
    ///
    /// # Errors
    ///
    /// [`ForwardError::InvalidEndpoint`] when the URL cannot be used.
    pub fn spawn(config: ForwardConfig) -> Result<(Forwarder, JoinHandle<()>), ForwardError> {
        let invalid = |reason: String| ForwardError::InvalidEndpoint {
            endpoint: config.endpoint.clone(),
            reason,
        };
        let endpoint = Endpoint::from_shared(config.endpoint.clone())
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(config.timeout)
            .timeout(config.timeout)
            .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        let (tx, rx) = mpsc::channel(config.queue);
        let stats = Arc::new(ForwardStats::default());
        let task = tokio::spawn(run(rx, channel, config, stats.clone()));
        Ok((Forwarder { tx, stats }, task))
    }

    /// Queues `item` without waiting; drops (and counts) it when the queue is full.
    pub fn offer(&self, item: ForwardItem) {
        if self.tx.try_send(item).is_err() {
            self.stats.requests_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The forwarder's counters.
    pub fn stats(&self) -> ForwardCounts {
        self.stats.snapshot()
    }
}

/// Removes open-span snapshots; returns the spans left and how many were removed.
fn without_snapshots(mut req: ExportTraceServiceRequest) -> (ExportTraceServiceRequest, u64, u64) {
    let mut removed = 0u64;
    let mut kept = 0u64;
    for rs in &mut req.resource_spans {
        for ss in &mut rs.scope_spans {
            let before = ss.spans.len();
            ss.spans.retain(|s| !span_is_snapshot(s));
            removed += (before - ss.spans.len()) as u64;
            kept += ss.spans.len() as u64;
        }
        rs.scope_spans.retain(|ss| !ss.spans.is_empty());
    }
    req.resource_spans.retain(|rs| !rs.scope_spans.is_empty());
    (req, kept, removed)
}

fn retryable(code: Code) -> bool {
    // OTLP spec, "Failures": these may succeed later. Unknown covers
    // transport errors such as a refused connection.
    matches!(
        code,
        Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unavailable
            | Code::DataLoss
            | Code::ResourceExhausted
            | Code::Unknown
    )
}

async fn send_once(channel: &Channel, item: &ForwardItem) -> Result<(), tonic::Status> {
    match item {
        ForwardItem::Traces(req) => TraceServiceClient::new(channel.clone())
            .export(req.clone())
            .await
            .map(drop),
        ForwardItem::Logs(req) => LogsServiceClient::new(channel.clone())
            .export(req.clone())
            .await
            .map(drop),
        ForwardItem::Metrics(req) => MetricsServiceClient::new(channel.clone())
            .export(req.clone())
            .await
            .map(drop),
    }
}

async fn run(
    mut rx: mpsc::Receiver<ForwardItem>,
    channel: Channel,
    config: ForwardConfig,
    stats: Arc<ForwardStats>,
) {
    while let Some(item) = rx.recv().await {
        let (item, spans) = match item {
            ForwardItem::Traces(req) => {
                let (req, kept, removed) = without_snapshots(req);
                stats
                    .snapshots_skipped
                    .fetch_add(removed, Ordering::Relaxed);
                if kept == 0 {
                    continue;
                }
                (ForwardItem::Traces(req), kept)
            }
            other => (other, 0),
        };
        let mut backoff = config.initial_backoff;
        let mut attempt = 1;
        loop {
            match send_once(&channel, &item).await {
                Ok(()) => {
                    stats.requests_forwarded.fetch_add(1, Ordering::Relaxed);
                    stats.spans_forwarded.fetch_add(spans, Ordering::Relaxed);
                    break;
                }
                Err(status) if attempt < config.max_attempts && retryable(status.code()) => {
                    stats.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(attempt, code = ?status.code(), "Forwarding failed; retrying.");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(config.max_backoff);
                    attempt += 1;
                }
                Err(status) => {
                    stats.requests_dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        endpoint = %config.endpoint,
                        code = ?status.code(),
                        message = status.message(),
                        "Forwarding failed; dropping the request."
                    );
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    #[test]
    fn snapshots_are_removed() {
        let snap = Span {
            attributes: vec![KeyValue {
                key: "incomplete".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::BoolValue(true)),
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![
                    ScopeSpans {
                        spans: vec![snap.clone()],
                        ..Default::default()
                    },
                    ScopeSpans {
                        spans: vec![Span::default(), snap],
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
        };
        let (req, kept, removed) = without_snapshots(req);
        assert_eq!((kept, removed), (1, 2));
        assert_eq!(req.resource_spans[0].scope_spans.len(), 1);
    }
}
