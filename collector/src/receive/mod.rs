//! The receive stage: OTLP over gRPC (`grpc.rs`) and HTTP (`http.rs`).
//!
//! A receiver only decodes, counts and hands on: each export request becomes
//! one [`Record::Encoded`] sent through the store stage's bounded queue, and the
//! client gets its answer once that batch is committed. A full queue becomes
//! `UNAVAILABLE` / HTTP 503 with `Retry-After`, so an OTLP exporter backs off
//! and retries; a retried export is stored once (the store is idempotent).
//! After the commit, the request is offered to the forwarder, which never
//! blocks.
//!
//! Before any of that, both ports may ask for a bearer token ([`Token`]) and
//! speak TLS ([`TlsFiles`]); refused attempts are counted per sender and
//! stored as `kms.collector.rejected` events ([`rejected`]).

pub(crate) mod auth;
pub(crate) mod conn;
pub(crate) mod convert;
pub(crate) mod grpc;
pub(crate) mod http;
mod idle;
pub mod rejected;

pub use auth::{Token, TokenError};
pub use conn::{TlsError, TlsFiles};
pub use rejected::REJECTED_EVENT;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

use crate::forward::{ForwardItem, Forwarder};
use crate::store::encoded::EncodedBatch;
use crate::store::{Record, StoreHandle, SubmitError};
use auth::RejectReason;
use rejected::Rejections;

/// How long a client may take to send its request headers (HTTP) or its
/// whole request (both), by default.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request waits for its commit before the client is told to
/// retry (503 / `UNAVAILABLE`), by default.
pub const DEFAULT_COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP request body, after decompression, by default (as the
/// OpenTelemetry Collector).
pub const DEFAULT_HTTP_MAX_BODY: usize = 20 * 1024 * 1024;
/// Largest gRPC message, after decompression, by default (as the
/// OpenTelemetry Collector).
pub const DEFAULT_GRPC_MAX_MESSAGE: usize = 4 * 1024 * 1024;
/// What `Retry-After` says under backpressure, in seconds.
pub(crate) const RETRY_AFTER_SECS: u64 = 1;

/// Limits and timeouts of both receivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) http_max_body: usize,
    pub(crate) grpc_max_message: usize,
    pub(crate) read_timeout: Duration,
    pub(crate) commit_timeout: Duration,
}

/// The receivers' counters, read with [`ReceiverStats::snapshot`].
#[derive(Debug, Default)]
pub struct ReceiverStats {
    requests: AtomicU64,
    requests_malformed: AtomicU64,
    requests_refused: AtomicU64,
    requests_failed: AtomicU64,
    requests_unauthenticated: AtomicU64,
    spans_received: AtomicU64,
    spans_rejected: AtomicU64,
    spans_stored: AtomicU64,
    log_records_stored: AtomicU64,
    metric_points_stored: AtomicU64,
}

/// The receivers' counters at one instant; every count is since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReceiverCounts {
    /// Export requests decoded (both protocols, all signals).
    pub requests: u64,
    /// Requests that could not be decoded (400 / `INVALID_ARGUMENT`, 413, 415, ...).
    pub requests_malformed: u64,
    /// Requests refused because the store queue was full (503 / `UNAVAILABLE`).
    pub requests_refused: u64,
    /// Requests whose commit failed or timed out (503 / `UNAVAILABLE`).
    pub requests_failed: u64,
    /// Requests refused for no or a wrong token (401 / `UNAUTHENTICATED`).
    /// Per sender, with failed TLS handshakes, in the
    /// `kms.collector.rejected` events.
    pub requests_unauthenticated: u64,
    /// Spans in decoded requests, valid or not.
    pub spans_received: u64,
    /// Spans rejected for invalid ids (reported in `partial_success`).
    pub spans_rejected: u64,
    /// Spans committed to the store (retries counted again).
    pub spans_stored: u64,
    /// Log records committed.
    pub log_records_stored: u64,
    /// Metric data points committed.
    pub metric_points_stored: u64,
}

impl ReceiverCounts {
    /// The counts as `(name, value)` pairs, the names stored in `collector_stats`.
    pub fn pairs(&self) -> Vec<(String, i64)> {
        let v = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
        [
            ("receiver.requests", self.requests),
            ("receiver.requests_malformed", self.requests_malformed),
            ("receiver.requests_refused", self.requests_refused),
            ("receiver.requests_failed", self.requests_failed),
            (
                "receiver.requests_unauthenticated",
                self.requests_unauthenticated,
            ),
            ("receiver.spans_received", self.spans_received),
            ("receiver.spans_rejected", self.spans_rejected),
            ("receiver.spans_stored", self.spans_stored),
            ("receiver.log_records_stored", self.log_records_stored),
            ("receiver.metric_points_stored", self.metric_points_stored),
        ]
        .into_iter()
        .map(|(k, x)| (k.to_owned(), v(x)))
        .collect()
    }
}

impl ReceiverStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> ReceiverCounts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ReceiverCounts {
            requests: g(&self.requests),
            requests_malformed: g(&self.requests_malformed),
            requests_refused: g(&self.requests_refused),
            requests_failed: g(&self.requests_failed),
            requests_unauthenticated: g(&self.requests_unauthenticated),
            spans_received: g(&self.spans_received),
            spans_rejected: g(&self.spans_rejected),
            spans_stored: g(&self.spans_stored),
            log_records_stored: g(&self.log_records_stored),
            metric_points_stored: g(&self.metric_points_stored),
        }
    }

    pub(crate) fn malformed(&self) {
        self.requests_malformed.fetch_add(1, Ordering::Relaxed);
    }
}

/// What an accepted export answers: items rejected and why.
#[derive(Debug, Default)]
pub(crate) struct Accepted {
    pub(crate) rejected: i64,
    pub(crate) message: String,
}

/// Why an export was not accepted. Both are retryable for the client.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IngestError {
    /// The store queue is full.
    #[error("the collector is busy storing earlier exports; retry later")]
    Busy,
    /// The commit failed, timed out, or the collector is shutting down.
    #[error("storing the export failed: {0}")]
    Unavailable(String),
}

/// The shared path of both receivers: authorize, convert, store, wait,
/// forward.
#[derive(Debug)]
pub(crate) struct Ingest {
    store: StoreHandle,
    forward: Option<Forwarder>,
    stats: Arc<ReceiverStats>,
    limits: Limits,
    token: Option<Token>,
    rejections: Arc<Rejections>,
}

pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Ingest {
    pub(crate) fn new(
        store: StoreHandle,
        forward: Option<Forwarder>,
        stats: Arc<ReceiverStats>,
        limits: Limits,
        token: Option<Token>,
        rejections: Arc<Rejections>,
    ) -> Self {
        Ingest {
            store,
            forward,
            stats,
            limits,
            token,
            rejections,
        }
    }

    /// Checks the request's `authorization` header against the token, if
    /// one is required; a refusal is counted against `peer` (and logged the
    /// first time, without the header's value).
    pub(crate) fn authorize(
        &self,
        authorization: Option<&[u8]>,
        peer: Option<IpAddr>,
        protocol: &'static str,
    ) -> Result<(), RejectReason> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        token.check(authorization).inspect_err(|reason| {
            self.stats
                .requests_unauthenticated
                .fetch_add(1, Ordering::Relaxed);
            if self.rejections.record(peer, *reason, now_ns()) {
                let peer = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
                tracing::warn!(%peer, protocol, reason = reason.as_str(), "Refused an OTLP export without a valid token; counting further ones from this sender.");
            }
        })
    }

    pub(crate) fn rejections(&self) -> &Arc<Rejections> {
        &self.rejections
    }

    pub(crate) fn stats(&self) -> &ReceiverStats {
        &self.stats
    }

    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// Stores `batch` and waits for its commit.
    async fn commit(&self, batch: EncodedBatch) -> Result<(), IngestError> {
        let pending = match self.store.try_write(vec![Record::Encoded(batch)]) {
            Ok(p) => p,
            Err(SubmitError::Busy) => {
                self.stats.requests_refused.fetch_add(1, Ordering::Relaxed);
                return Err(IngestError::Busy);
            }
            Err(e) => {
                self.stats.requests_failed.fetch_add(1, Ordering::Relaxed);
                return Err(IngestError::Unavailable(e.to_string()));
            }
        };
        let result =
            match tokio::time::timeout(self.limits.commit_timeout, pending.committed()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out waiting for the commit".to_owned(),
            };
        self.stats.requests_failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %result, "Export not stored; the client will retry.");
        Err(IngestError::Unavailable(result))
    }

    fn forward(&self, item: ForwardItem) {
        if let Some(f) = &self.forward {
            f.offer(item);
        }
    }

    pub(crate) async fn traces(
        &self,
        req: ExportTraceServiceRequest,
    ) -> Result<Accepted, IngestError> {
        self.store_traces(req, true).await
    }

    /// Like [`Self::traces`], never forwarded: spans a Jaeger writes to its
    /// remote storage (`serve --jaeger-storage`). Forwarding them to a
    /// Jaeger, maybe that same one, would send them round for ever.
    pub(crate) async fn traces_from_jaeger(
        &self,
        req: ExportTraceServiceRequest,
    ) -> Result<Accepted, IngestError> {
        self.store_traces(req, false).await
    }

    async fn store_traces(
        &self,
        req: ExportTraceServiceRequest,
        forward: bool,
    ) -> Result<Accepted, IngestError> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let conv = convert::traces(&req, now_ns());
        let n = conv.rows.len() as u64;
        self.stats
            .spans_received
            .fetch_add(n + conv.rejected as u64, Ordering::Relaxed);
        self.stats
            .spans_rejected
            .fetch_add(conv.rejected as u64, Ordering::Relaxed);
        if n > 0 {
            self.commit(EncodedBatch {
                spans: conv.rows,
                ..EncodedBatch::default()
            })
            .await?;
            self.stats.spans_stored.fetch_add(n, Ordering::Relaxed);
            if forward {
                self.forward(ForwardItem::Traces(req));
            }
        }
        Ok(Accepted {
            rejected: conv.rejected,
            message: conv.reason.unwrap_or_default(),
        })
    }

    pub(crate) async fn logs(
        &self,
        req: ExportLogsServiceRequest,
    ) -> Result<Accepted, IngestError> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let conv = convert::logs(&req, now_ns());
        let n = conv.rows.len() as u64;
        if n > 0 {
            self.commit(EncodedBatch {
                events: conv.rows,
                ..EncodedBatch::default()
            })
            .await?;
            self.stats
                .log_records_stored
                .fetch_add(n, Ordering::Relaxed);
            self.forward(ForwardItem::Logs(req));
        }
        Ok(Accepted::default())
    }

    pub(crate) async fn metrics(
        &self,
        req: ExportMetricsServiceRequest,
    ) -> Result<Accepted, IngestError> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let conv = convert::metrics(&req, now_ns());
        let n = conv.rows.len() as u64;
        if n > 0 {
            self.commit(EncodedBatch {
                metrics: conv.rows,
                ..EncodedBatch::default()
            })
            .await?;
            self.stats
                .metric_points_stored
                .fetch_add(n, Ordering::Relaxed);
            self.forward(ForwardItem::Metrics(req));
        }
        Ok(Accepted::default())
    }
}
