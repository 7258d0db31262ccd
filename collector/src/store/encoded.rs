//! Rows already encoded for SQLite: JSON text and dedup keys computed by
//! whoever sends them, so that the one store thread only inserts.

use std::sync::Arc;

use super::{Batch, EventRow, MetricSample, SpanRow};

/// A batch encoded for storage: what [`super::Record::Encoded`] carries.
///
/// The receivers build it on their own tasks, straight from OTLP, so the
/// serial part of ingest (the store thread) does no JSON work. Any [`Batch`]
/// converts into one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EncodedBatch {
    pub(crate) spans: Vec<EncodedSpan>,
    pub(crate) events: Vec<EncodedEvent>,
    pub(crate) metrics: Vec<EncodedMetric>,
}

impl EncodedBatch {
    /// Spans, events and samples together.
    pub fn len(&self) -> usize {
        self.spans.len() + self.events.len() + self.metrics.len()
    }

    /// True when there is nothing to store.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A [`SpanRow`] with its JSON columns as text.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EncodedSpan {
    pub(crate) trace_id: String,
    pub(crate) span_id: String,
    pub(crate) parent_span_id: Option<String>,
    pub(crate) name: String,
    pub(crate) kind: i32,
    pub(crate) service: Option<Arc<str>>,
    pub(crate) scope: Option<Arc<str>>,
    pub(crate) start_ns: i64,
    pub(crate) end_ns: i64,
    pub(crate) status_code: i32,
    pub(crate) status_message: Option<String>,
    pub(crate) incomplete: bool,
    pub(crate) snapshot_seq: Option<i64>,
    pub(crate) attributes: String,
    pub(crate) events: String,
    pub(crate) resource: Arc<str>,
    pub(crate) received_ns: i64,
}

/// An [`EventRow`] with its attributes as text and its dedup key.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EncodedEvent {
    pub(crate) time_ns: i64,
    pub(crate) name: String,
    pub(crate) severity: Option<String>,
    pub(crate) trace_id: Option<String>,
    pub(crate) span_id: Option<String>,
    pub(crate) service: Option<Arc<str>>,
    pub(crate) body: Option<String>,
    pub(crate) attributes: String,
    pub(crate) received_ns: i64,
    pub(crate) dedup_key: String,
}

/// A [`MetricSample`] with its attributes as text and its dedup key.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EncodedMetric {
    pub(crate) time_ns: i64,
    pub(crate) name: String,
    pub(crate) value: Option<f64>,
    pub(crate) attributes: String,
    pub(crate) service: Option<Arc<str>>,
    pub(crate) received_ns: i64,
    pub(crate) dedup_key: String,
}

fn json_text(value: &serde_json::Value) -> String {
    // Serialising a `Value` cannot fail (its map keys are strings).
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

impl From<&SpanRow> for EncodedSpan {
    fn from(s: &SpanRow) -> Self {
        EncodedSpan {
            trace_id: s.trace_id.clone(),
            span_id: s.span_id.clone(),
            parent_span_id: s.parent_span_id.clone(),
            name: s.name.clone(),
            kind: s.kind,
            service: s.service.as_deref().map(Arc::from),
            scope: s.scope.as_deref().map(Arc::from),
            start_ns: s.start_ns,
            end_ns: s.end_ns,
            status_code: s.status_code,
            status_message: s.status_message.clone(),
            incomplete: s.incomplete,
            snapshot_seq: s.snapshot_seq,
            attributes: json_text(&s.attributes),
            events: json_text(&s.events),
            resource: Arc::from(json_text(&s.resource)),
            received_ns: s.received_ns,
        }
    }
}

impl EncodedEvent {
    /// An event row; computes its dedup key from everything but `received_ns`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        time_ns: i64,
        name: String,
        severity: Option<String>,
        trace_id: Option<String>,
        span_id: Option<String>,
        service: Option<Arc<str>>,
        body: Option<String>,
        attributes: String,
        received_ns: i64,
    ) -> Self {
        let dedup_key = DedupKey::new()
            .field(&time_ns.to_le_bytes())
            .field(name.as_bytes())
            .opt(severity.as_deref())
            .opt(trace_id.as_deref())
            .opt(span_id.as_deref())
            .opt(service.as_deref())
            .opt(body.as_deref())
            .field(attributes.as_bytes())
            .finish();
        EncodedEvent {
            time_ns,
            name,
            severity,
            trace_id,
            span_id,
            service,
            body,
            attributes,
            received_ns,
            dedup_key,
        }
    }
}

impl From<&EventRow> for EncodedEvent {
    fn from(e: &EventRow) -> Self {
        EncodedEvent::new(
            e.time_ns,
            e.name.clone(),
            e.severity.clone(),
            e.trace_id.clone(),
            e.span_id.clone(),
            e.service.as_deref().map(Arc::from),
            e.body.clone(),
            json_text(&e.attributes),
            e.received_ns,
        )
    }
}

impl EncodedMetric {
    /// A sample row; computes its dedup key from everything but `received_ns`.
    pub(crate) fn new(
        time_ns: i64,
        name: String,
        value: Option<f64>,
        attributes: String,
        service: Option<Arc<str>>,
        received_ns: i64,
    ) -> Self {
        let bits = value.map(f64::to_bits).unwrap_or(u64::MAX);
        let dedup_key = DedupKey::new()
            .field(&time_ns.to_le_bytes())
            .field(name.as_bytes())
            .field(&bits.to_le_bytes())
            .opt(service.as_deref())
            .field(attributes.as_bytes())
            .finish();
        EncodedMetric {
            time_ns,
            name,
            value,
            attributes,
            service,
            received_ns,
            dedup_key,
        }
    }
}

impl From<&MetricSample> for EncodedMetric {
    fn from(m: &MetricSample) -> Self {
        EncodedMetric::new(
            m.time_ns,
            m.name.clone(),
            m.value,
            json_text(&m.attributes),
            m.service.as_deref().map(Arc::from),
            m.received_ns,
        )
    }
}

impl From<&Batch> for EncodedBatch {
    fn from(b: &Batch) -> Self {
        EncodedBatch {
            spans: b.spans.iter().map(EncodedSpan::from).collect(),
            events: b.events.iter().map(EncodedEvent::from).collect(),
            metrics: b.metrics.iter().map(EncodedMetric::from).collect(),
        }
    }
}

/// A 128-bit content hash (two FNV-1a lanes with different multipliers)
/// over length-prefixed fields, as lowercase hex: stable across versions
/// and platforms, which `std`'s hasher does not promise.
struct DedupKey {
    a: u64,
    b: u64,
}

impl DedupKey {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    const PRIME_B: u64 = 0x9e37_79b9_7f4a_7c15;

    fn new() -> Self {
        DedupKey {
            a: 0xcbf2_9ce4_8422_2325,
            b: 0x6c62_272e_07bb_0142,
        }
    }

    fn bytes(mut self, data: &[u8]) -> Self {
        for &byte in data {
            self.a = (self.a ^ u64::from(byte)).wrapping_mul(Self::PRIME);
            self.b = (self.b ^ u64::from(byte)).wrapping_mul(Self::PRIME_B);
        }
        self
    }

    fn field(self, data: &[u8]) -> Self {
        self.bytes(&(data.len() as u64).to_le_bytes()).bytes(data)
    }

    fn opt(self, data: Option<&str>) -> Self {
        match data {
            None => self.bytes(&[0]),
            Some(s) => self.bytes(&[1]).field(s.as_bytes()),
        }
    }

    fn finish(self) -> String {
        format!("{:016x}{:016x}", self.a, self.b)
    }
}
