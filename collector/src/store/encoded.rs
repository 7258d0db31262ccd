//! Rows already encoded for SQLite: ids as bytes, JSON text and dedup keys
//! computed by whoever sends them, so that the one store thread only inserts.

use std::sync::Arc;

use super::{Batch, EventRow, MetricSample, SpanRow, StoreError};

/// A batch encoded for storage: what [`super::Record::Encoded`] carries.
///
/// The receivers build it on their own tasks, straight from OTLP, so the
/// serial part of ingest (the store thread) does no JSON work. The store
/// encodes a [`Batch`] into one itself.
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

/// A trace or span id as the bytes stored in `span_rows` (16 and 8 bytes
/// from OTLP; up to 16 from a hand-made [`SpanRow`]), held inline so that
/// encoding a span allocates nothing for its ids.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct RawId {
    len: u8,
    bytes: [u8; 16],
}

impl RawId {
    /// The id of `bytes`, or `None` when longer than 16 bytes.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let mut id = RawId {
            len: u8::try_from(bytes.len()).ok().filter(|&n| n <= 16)?,
            bytes: [0; 16],
        };
        id.bytes[..bytes.len()].copy_from_slice(bytes);
        Some(id)
    }

    /// Parses hex digits (either case), or `None` when `hex` is not an even
    /// number of at most 32 hex digits.
    pub(crate) fn from_hex(hex: &str) -> Option<Self> {
        let digits = hex.as_bytes();
        if !digits.len().is_multiple_of(2) || digits.len() > 32 {
            return None;
        }
        let mut id = RawId {
            len: u8::try_from(digits.len() / 2).ok()?,
            bytes: [0; 16],
        };
        for (out, pair) in id.bytes.iter_mut().zip(digits.chunks_exact(2)) {
            *out = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Some(id)
    }

    /// The stored bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

fn nibble(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Lowercase hex of `bytes`: how ids read outside the store.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

impl std::fmt::Debug for RawId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex(self.as_bytes()))
    }
}

impl rusqlite::ToSql for RawId {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(rusqlite::types::ToSqlOutput::Borrowed(
            rusqlite::types::ValueRef::Blob(self.as_bytes()),
        ))
    }
}

/// A [`SpanRow`] with its ids as bytes and its JSON columns as text. The
/// resource is its JSON text: the store turns it (with `service` and
/// `scope`) into a `resources` row id, and `service` and `name` into an
/// `operations` row id.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EncodedSpan {
    pub(crate) trace_id: RawId,
    pub(crate) span_id: RawId,
    pub(crate) parent_span_id: Option<RawId>,
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

fn id_of(hex: &str) -> Result<RawId, StoreError> {
    RawId::from_hex(hex).ok_or_else(|| StoreError::InvalidId { id: hex.to_owned() })
}

impl TryFrom<&SpanRow> for EncodedSpan {
    type Error = StoreError;

    fn try_from(s: &SpanRow) -> Result<Self, StoreError> {
        Ok(EncodedSpan {
            trace_id: id_of(&s.trace_id)?,
            span_id: id_of(&s.span_id)?,
            parent_span_id: s.parent_span_id.as_deref().map(id_of).transpose()?,
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
        })
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

impl EncodedBatch {
    /// Encodes a hand-made batch.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidId`] for a trace or span id that is not hex.
    pub(crate) fn encode(b: &Batch) -> Result<Self, StoreError> {
        Ok(EncodedBatch {
            spans: b
                .spans
                .iter()
                .map(EncodedSpan::try_from)
                .collect::<Result<_, _>>()?,
            events: b.events.iter().map(EncodedEvent::from).collect(),
            metrics: b.metrics.iter().map(EncodedMetric::from).collect(),
        })
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
