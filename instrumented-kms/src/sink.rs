//! Where diagnostic parts hand their events: the export queue when OTLP is
//! on, always the log for `Warn` and `Error` ones.

use std::fmt;
use std::sync::Arc;

use crate::event::{DiagEvent, Severity};

/// A cheap, cloneable, non-blocking handle that diagnostic parts (watchdog,
/// deadlock checker, samplers) use to emit [`DiagEvent`]s. Emitting never
/// blocks: the export queue drops and counts when it is full.
#[derive(Clone)]
pub struct EventSink {
    deliver: Arc<dyn Fn(DiagEvent) + Send + Sync>,
}

impl EventSink {
    /// A sink that hands every event to `deliver` (which must not block).
    pub fn new(deliver: impl Fn(DiagEvent) + Send + Sync + 'static) -> Self {
        Self {
            deliver: Arc::new(deliver),
        }
    }

    /// A sink that only logs `Warn` and `Error` events (used when OTLP export is off).
    pub fn log_only() -> Self {
        Self::new(|event| log_event(&event))
    }

    /// Emits one event. Never blocks.
    pub fn emit(&self, event: DiagEvent) {
        (self.deliver)(event)
    }
}

impl fmt::Debug for EventSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventSink").finish_non_exhaustive()
    }
}

/// Writes a `Warn`/`Error` event to the log, so an operator reading stderr sees
/// stalls and deadlocks even without a collector.
pub(crate) fn log_event(event: &DiagEvent) {
    match event.severity {
        Severity::Error => {
            tracing::error!(target: "instrumented_kms::diag", event = event.name, attributes = ?event.attributes, "{}", event.body)
        }
        Severity::Warn => {
            tracing::warn!(target: "instrumented_kms::diag", event = event.name, attributes = ?event.attributes, "{}", event.body)
        }
        Severity::Info => {}
    }
}
