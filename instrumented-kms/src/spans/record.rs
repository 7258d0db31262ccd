//! What we keep about one span while it is open, and what the export thread
//! gets when it closes.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// An attribute value, kept in Rust form until the export thread encodes it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// OpenTelemetry span kind (numbering as in the OTLP protobuf).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpanKind {
    Internal = 1,
    Server = 2,
    Client = 3,
    Producer = 4,
    Consumer = 5,
}

impl SpanKind {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        [
            ("internal", Self::Internal),
            ("server", Self::Server),
            ("client", Self::Client),
            ("producer", Self::Producer),
            ("consumer", Self::Consumer),
        ]
        .into_iter()
        .find(|(name, _)| s.eq_ignore_ascii_case(name))
        .map(|(_, kind)| kind)
    }
}

/// OpenTelemetry span status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpanStatus {
    Unset,
    Ok,
    Error,
}

/// The mutable part of a span: attributes recorded after creation, status.
#[derive(Debug)]
pub(crate) struct Mutable {
    pub(crate) name: Cow<'static, str>,
    pub(crate) kind: SpanKind,
    pub(crate) attributes: Vec<(&'static str, Value)>,
    pub(crate) status: SpanStatus,
}

/// One span, shared between the span's extensions, the open-span set and
/// (while entered) a thread's stack.
#[derive(Debug)]
pub(crate) struct SpanRecord {
    pub(crate) trace_id: [u8; 16],
    pub(crate) span_id: [u8; 8],
    pub(crate) parent_span_id: Option<[u8; 8]>,
    pub(crate) start_unix_nanos: u64,
    pub(crate) start: Instant,
    pub(crate) mutable: Mutex<Mutable>,
    /// Whether this span's trace was sampled for ordinary export (decided at
    /// the root). Unsampled spans are still exported if they turn out slow,
    /// failed or stuck.
    pub(crate) sampled: bool,
    /// How many open-span snapshots were taken (0: never reported open).
    pub(crate) snapshot_seq: AtomicU32,
    /// For a request span (`kms.request`): the tokio task that last entered
    /// it (or created it), so a task dump can be matched to the request.
    /// 0: not a request span, or never inside a tokio task.
    pub(crate) task_id: AtomicU64,
}

impl SpanRecord {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Mutable> {
        self.mutable.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn was_snapshotted(&self) -> bool {
        self.snapshot_seq.load(Ordering::Relaxed) > 0
    }

    /// The tokio task that last entered this request span, if known.
    #[cfg_attr(not(feature = "taskdump"), allow(dead_code))]
    pub(crate) fn task_id(&self) -> Option<u64> {
        Some(self.task_id.load(Ordering::Relaxed)).filter(|id| *id != 0)
    }

    /// Key in the open-span set.
    pub(crate) fn key(&self) -> u64 {
        u64::from_be_bytes(self.span_id)
    }
}

/// A span that has closed, on its way to the export thread.
#[derive(Debug)]
pub(crate) struct ClosedSpan {
    pub(crate) record: std::sync::Arc<SpanRecord>,
    pub(crate) end_unix_nanos: u64,
    /// Slow (over the open-span threshold), error, or reported open before:
    /// takes the export queue's priority lane.
    pub(crate) priority: bool,
}

/// Wall-clock time of an [`Instant`], from one (wall, monotonic) pair read
/// once per process: one clock read per timestamp instead of two (clock
/// reads are not free in every VM).
pub(crate) fn instant_unix_nanos(t: Instant) -> u64 {
    static BASE: std::sync::OnceLock<(Instant, u64)> = std::sync::OnceLock::new();
    let (base_instant, base_unix) =
        *BASE.get_or_init(|| (Instant::now(), unix_nanos(SystemTime::now())));
    match t.checked_duration_since(base_instant) {
        Some(d) => base_unix.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        None => base_unix.saturating_sub(
            u64::try_from(base_instant.duration_since(t).as_nanos()).unwrap_or(u64::MAX),
        ),
    }
}

/// Now as nanoseconds since the Unix epoch.
pub(crate) fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
