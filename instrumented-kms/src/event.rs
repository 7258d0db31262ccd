//! Diagnostic events: the one shape every diagnostic part (watchdog, deadlock
//! checker, metrics samplers, process facts, the exporter's own drop reports)
//! hands to the export thread. Their wire form is an OTLP log record; see
//! `docs/wire-format.md`.

use std::time::SystemTime;

/// How urgent an event is. `Critical` events (stalls, deadlocks) take the
/// priority lane of the export queue and are never dropped in favour of
/// ordinary spans; `Sample` events (periodic metrics) may be dropped and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Periodic samples: runtime and task metrics, process facts.
    Info,
    /// Something degraded but not stuck: export drops, slow polls.
    Warn,
    /// Stalls and deadlocks: the evidence for hypothesis D.
    Error,
}

/// An attribute value of a diagnostic event.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    /// A string (also used for small JSON documents, see the wire format).
    Str(String),
    /// A signed integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
}

/// One diagnostic event, e.g. `kms.stall` or `kms.process`.
#[derive(Debug, Clone)]
pub struct DiagEvent {
    /// Event name, `kms.*`; the full list is in `docs/wire-format.md`.
    pub name: &'static str,
    /// Severity; `Error` events take the export queue's priority lane.
    pub severity: Severity,
    /// When it was observed.
    pub time: SystemTime,
    /// A one-line human summary, exported as the log record body.
    pub body: String,
    /// Trace id (16 bytes) of the span the event concerns, if any.
    pub trace_id: Option<[u8; 16]>,
    /// Span id (8 bytes) of the span the event concerns, if any.
    pub span_id: Option<[u8; 8]>,
    /// Attributes, names as in `docs/wire-format.md`.
    pub attributes: Vec<(&'static str, AttrValue)>,
}

impl DiagEvent {
    /// A new event observed now, with no span and no attributes.
    pub fn new(name: &'static str, severity: Severity, body: impl Into<String>) -> Self {
        Self {
            name,
            severity,
            time: SystemTime::now(),
            body: body.into(),
            trace_id: None,
            span_id: None,
            attributes: Vec::new(),
        }
    }

    /// Adds an attribute.
    pub fn attr(mut self, key: &'static str, value: impl Into<AttrValue>) -> Self {
        self.attributes.push((key, value.into()));
        self
    }
}

impl From<String> for AttrValue {
    fn from(v: String) -> Self {
        AttrValue::Str(v)
    }
}
impl From<&str> for AttrValue {
    fn from(v: &str) -> Self {
        AttrValue::Str(v.to_owned())
    }
}
impl From<i64> for AttrValue {
    fn from(v: i64) -> Self {
        AttrValue::Int(v)
    }
}
impl From<u64> for AttrValue {
    fn from(v: u64) -> Self {
        AttrValue::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<usize> for AttrValue {
    fn from(v: usize) -> Self {
        AttrValue::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<f64> for AttrValue {
    fn from(v: f64) -> Self {
        AttrValue::Float(v)
    }
}
impl From<bool> for AttrValue {
    fn from(v: bool) -> Self {
        AttrValue::Bool(v)
    }
}
