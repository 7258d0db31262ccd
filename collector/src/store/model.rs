//! Rows as the store holds them. Field meanings are those of `schema.sql`
//! and `docs/schema.md`: times in Unix nanoseconds, ids in lowercase hex,
//! attributes as JSON objects.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One span: a closed span or an open-span snapshot (`incomplete`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpanRow {
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// Parent span id, if any.
    pub parent_span_id: Option<String>,
    /// Span name, e.g. `kms.request`.
    pub name: String,
    /// OTLP SpanKind number.
    pub kind: i32,
    /// Resource `service.name`.
    pub service: Option<String>,
    /// Instrumentation scope name.
    pub scope: Option<String>,
    /// Start time.
    pub start_ns: i64,
    /// End time; the snapshot time while `incomplete`.
    pub end_ns: i64,
    /// 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    /// Status message, if any.
    pub status_message: Option<String>,
    /// True for an open-span snapshot.
    pub incomplete: bool,
    /// `kms.open.snapshot_seq` of a snapshot.
    pub snapshot_seq: Option<i64>,
    /// Span attributes (JSON object).
    pub attributes: Value,
    /// Span events (JSON array of `{"time_ns","name","attributes"}`).
    pub events: Value,
    /// Resource attributes (JSON object).
    pub resource: Value,
    /// When the collector received it.
    pub received_ns: i64,
}

/// One log record, e.g. a `kms.stall` diagnostic event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRow {
    /// Observed or record time.
    pub time_ns: i64,
    /// `event_name` / `event.name`, empty if none.
    pub name: String,
    /// Severity text, e.g. `ERROR`.
    pub severity: Option<String>,
    /// Trace id the event concerns.
    pub trace_id: Option<String>,
    /// Span id the event concerns.
    pub span_id: Option<String>,
    /// Resource `service.name`.
    pub service: Option<String>,
    /// The record body as text.
    pub body: Option<String>,
    /// Attributes (JSON object).
    pub attributes: Value,
    /// When the collector received it.
    pub received_ns: i64,
}

/// One OTLP metric data point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricSample {
    /// Data point time.
    pub time_ns: i64,
    /// Metric name.
    pub name: String,
    /// The value (sums and gauges; histograms store their sum).
    pub value: Option<f64>,
    /// Data point attributes (JSON object).
    pub attributes: Value,
    /// Resource `service.name`.
    pub service: Option<String>,
    /// When the collector received it.
    pub received_ns: i64,
}

/// How one probe attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeOutcome {
    /// HTTP 2xx within the timeout.
    Ok,
    /// An HTTP answer with a non-2xx status.
    HttpStatus,
    /// TCP connect failed (refused, unreachable, or timed out connecting).
    Connect,
    /// TCP connected but the TLS handshake failed or timed out.
    Tls,
    /// Connected and handshaken, but no HTTP answer within the timeout.
    Timeout,
    /// Anything else.
    Other,
}

impl ProbeOutcome {
    /// The name stored in `probe_attempts.outcome`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeOutcome::Ok => "ok",
            ProbeOutcome::HttpStatus => "http_status",
            ProbeOutcome::Connect => "connect",
            ProbeOutcome::Tls => "tls",
            ProbeOutcome::Timeout => "timeout",
            ProbeOutcome::Other => "other",
        }
    }

    /// Parses a stored outcome name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ok" => ProbeOutcome::Ok,
            "http_status" => ProbeOutcome::HttpStatus,
            "connect" => ProbeOutcome::Connect,
            "tls" => ProbeOutcome::Tls,
            "timeout" => ProbeOutcome::Timeout,
            "other" => ProbeOutcome::Other,
            _ => return None,
        })
    }
}

/// One GetMeta probe attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeAttempt {
    /// When the attempt started.
    pub time_ns: i64,
    /// The URL probed.
    pub target: String,
    /// Time until the answer or the failure.
    pub latency_ms: Option<f64>,
    /// How it ended.
    pub outcome: ProbeOutcome,
    /// HTTP status, when there was an answer.
    pub http_status: Option<u16>,
    /// Error text, when it failed.
    pub error: Option<String>,
}

/// One task in a tokio-console snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsoleTaskRow {
    /// Console's task id.
    pub task_id: i64,
    /// tokio's task id (the `task.id` field), when present.
    pub tokio_task_id: Option<i64>,
    /// Task name, if named.
    pub name: Option<String>,
    /// Task kind (`task`, `blocking`, ...).
    pub kind: Option<String>,
    /// Where it was spawned (`file:line:col`).
    pub spawn_location: Option<String>,
    /// Task fields (JSON object).
    pub fields: Value,
    /// `running`, `idle`, `scheduled` or `completed`.
    pub state: String,
    /// Polls so far.
    pub polls: Option<i64>,
    /// Busy time so far.
    pub busy_ns: Option<i64>,
    /// Idle time so far.
    pub idle_ns: Option<i64>,
    /// Scheduled time so far.
    pub scheduled_ns: Option<i64>,
    /// Wakes so far.
    pub wakes: Option<i64>,
    /// Live wakers.
    pub waker_count: Option<i64>,
    /// Start of the last poll.
    pub last_poll_started_ns: Option<i64>,
    /// End of the last poll.
    pub last_poll_ended_ns: Option<i64>,
    /// Console lint warnings, e.g. `["lost-waker"]`.
    pub warnings: Vec<String>,
}

/// One resource (mutex, semaphore, ...) in a console snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsoleResourceRow {
    /// Console's resource id.
    pub resource_id: i64,
    /// e.g. `Mutex`, `Semaphore`.
    pub concrete_type: Option<String>,
    /// Resource kind.
    pub kind: Option<String>,
    /// Where it was created.
    pub location: Option<String>,
    /// Resource attributes (JSON object), e.g. `locked`, `permits`.
    pub attributes: Value,
}

/// One async operation (a task waiting on a resource) in a console snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsoleAsyncOpRow {
    /// Console's async-op id.
    pub async_op_id: i64,
    /// The resource it operates on.
    pub resource_id: Option<i64>,
    /// The task awaiting it.
    pub task_id: Option<i64>,
    /// e.g. `Mutex::lock`.
    pub source: Option<String>,
    /// Polls so far.
    pub polls: Option<i64>,
    /// Busy time so far.
    pub busy_ns: Option<i64>,
    /// Idle time so far.
    pub idle_ns: Option<i64>,
}

/// Everything one console update showed at one instant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConsoleSnapshot {
    /// When the snapshot was taken.
    pub snapshot_ns: i64,
    /// Tasks.
    pub tasks: Vec<ConsoleTaskRow>,
    /// Resources.
    pub resources: Vec<ConsoleResourceRow>,
    /// Async ops.
    pub async_ops: Vec<ConsoleAsyncOpRow>,
}

/// What one OTLP export request decoded into: written atomically.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// Spans and snapshots.
    pub spans: Vec<SpanRow>,
    /// Log records.
    pub events: Vec<EventRow>,
    /// Metric data points.
    pub metrics: Vec<MetricSample>,
}
