//! The span layer: ids, attributes, open-span set, per-thread stacks.

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use super::record::{
    instant_unix_nanos, ClosedSpan, Mutable, SpanKind, SpanRecord, SpanStatus, Value,
};
use super::registry::{self, OpenSpans};
use super::{ids, redact, ClosedSpanSink, Sampler, REQUEST_SPAN};

/// The current tokio task's id as a number; 0 outside a task.
fn current_task() -> u64 {
    tokio::task::try_id().map_or(0, crate::runtime::tokio_id_u64)
}

/// Tracks spans; see the module docs.
pub(crate) struct SpanLayer {
    open: Arc<OpenSpans>,
    sink: Arc<dyn ClosedSpanSink>,
    /// Spans open longer than this are "slow" and take the priority lane.
    slow_threshold: Duration,
    /// Keep per-thread stacks of entered spans (for the watchdog).
    track_threads: bool,
    sampler: Sampler,
}

impl fmt::Debug for SpanLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpanLayer")
            .field("slow_threshold", &self.slow_threshold)
            .field("track_threads", &self.track_threads)
            .finish_non_exhaustive()
    }
}

impl SpanLayer {
    pub(crate) fn new(
        open: Arc<OpenSpans>,
        sink: Arc<dyn ClosedSpanSink>,
        slow_threshold: Duration,
        track_threads: bool,
        sampler: Sampler,
    ) -> Self {
        Self {
            open,
            sink,
            slow_threshold,
            track_threads,
            sampler,
        }
    }
}

/// Records tracing fields as span attributes (with redaction) and picks up
/// the `otel.*` conventions of tracing-opentelemetry.
struct FieldVisitor<'a> {
    m: &'a mut Mutable,
}

impl FieldVisitor<'_> {
    /// Handles the `otel.*` conventions and `message`; true when consumed.
    fn special(&mut self, key: &str, value: &str) -> bool {
        match key {
            "message" => {}
            "otel.name" => self.m.name = Cow::Owned(value.to_owned()),
            "otel.kind" => {
                if let Some(kind) = SpanKind::parse(value) {
                    self.m.kind = kind;
                }
            }
            "otel.status_code" => {
                self.m.status = if value.eq_ignore_ascii_case("error") {
                    SpanStatus::Error
                } else if value.eq_ignore_ascii_case("ok") {
                    SpanStatus::Ok
                } else {
                    SpanStatus::Unset
                }
            }
            _ => return false,
        }
        true
    }

    fn put(&mut self, field: &Field, value: Value) {
        let key = field.name();
        if key == "message" {
            return;
        }
        let Some(value) = redact::attribute(key, value) else {
            return;
        };
        match self.m.attributes.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.m.attributes.push((key, value)),
        }
    }
}

impl Visit for FieldVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.special(field.name(), value) {
            self.put(field, Value::Str(value.to_owned()));
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::Int(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::Int(i64::try_from(value).unwrap_or(i64::MAX)));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::Float(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let value = format!("{value:?}");
        if !self.special(field.name(), &value) {
            self.put(field, Value::Str(value));
        }
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::Str(value.to_string()));
    }
}

/// Whether `metadata` is the library's request span (`kms.request`).
fn is_request(metadata: &tracing::Metadata<'_>) -> bool {
    metadata.name() == REQUEST_SPAN && metadata.target() == "instrumented_kms::rpc"
}

impl<S> Layer<S> for SpanLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let parent = span
            .parent()
            .and_then(|p| p.extensions().get::<Arc<SpanRecord>>().cloned());
        let start = Instant::now();
        let (trace_id, parent_span_id, sampled) = match &parent {
            Some(p) => (p.trace_id, Some(p.span_id), p.sampled),
            None => (ids::trace_id(), None, self.sampler.sample(start)),
        };
        let mut mutable = Mutable {
            name: Cow::Borrowed(attrs.metadata().name()),
            kind: SpanKind::Internal,
            attributes: Vec::with_capacity(attrs.fields().len()),
            status: SpanStatus::Unset,
        };
        attrs.record(&mut FieldVisitor { m: &mut mutable });
        let record = Arc::new(SpanRecord {
            trace_id,
            span_id: ids::span_id(),
            parent_span_id,
            start_unix_nanos: instant_unix_nanos(start),
            start,
            mutable: Mutex::new(mutable),
            sampled,
            snapshot_seq: AtomicU32::new(0),
            task_id: AtomicU64::new(if is_request(attrs.metadata()) {
                current_task()
            } else {
                0
            }),
        });
        self.open.insert(record.clone());
        span.extensions_mut().insert(record);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let ext = span.extensions();
        if let Some(record) = ext.get::<Arc<SpanRecord>>() {
            values.record(&mut FieldVisitor {
                m: &mut record.lock(),
            });
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        // An error event inside a span marks the span as failed (the message
        // itself is not exported: it may carry anything).
        if *event.metadata().level() != Level::ERROR {
            return;
        }
        if let Some(span) = ctx.event_span(event) {
            if let Some(record) = span.extensions().get::<Arc<SpanRecord>>() {
                record.lock().status = SpanStatus::Error;
            }
        }
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let request = is_request(span.metadata());
        if !self.track_threads && !request {
            return;
        }
        let ext = span.extensions();
        let Some(record) = ext.get::<Arc<SpanRecord>>() else {
            return;
        };
        if request {
            // The task that polls the request now: a host may create the span
            // in one task and run the handler in another.
            // Written only when it changed: a store on every enter would pull
            // the record's cache line away from the threads that read it.
            let task = current_task();
            if task != 0 && record.task_id.load(Ordering::Relaxed) != task {
                record.task_id.store(task, Ordering::Relaxed);
            }
        }
        if self.track_threads {
            registry::push(registry::Entered {
                id: id.into_u64(),
                name: span.name(),
                trace_id: record.trace_id,
                span_id: record.span_id,
            });
        }
    }

    fn on_exit(&self, id: &Id, _ctx: Context<'_, S>) {
        if self.track_threads {
            registry::pop(id.into_u64());
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(record) = span.extensions_mut().remove::<Arc<SpanRecord>>() else {
            return;
        };
        self.open.remove(&record);
        let end = Instant::now();
        let priority = record.was_snapshotted()
            || end.saturating_duration_since(record.start) >= self.slow_threshold
            || record.lock().status == SpanStatus::Error;
        if !priority && !record.sampled {
            self.sink.sampled_out();
            return;
        }
        self.sink.closed(ClosedSpan {
            record,
            end_unix_nanos: instant_unix_nanos(end),
            priority,
        });
    }
}
