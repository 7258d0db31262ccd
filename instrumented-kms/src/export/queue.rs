//! The bounded two-lane export queue.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use opentelemetry_proto::tonic::trace::v1::Span as ProtoSpan;

use crate::event::{DiagEvent, Severity};
use crate::guard::ExportStats;
use crate::spans::ClosedSpan;

/// One thing to export.
#[derive(Debug)]
pub(crate) enum Item {
    /// A closed span, not yet encoded.
    Closed(ClosedSpan),
    /// An open-span snapshot, already encoded by the reporter.
    Snapshot(ProtoSpan),
    /// An encoded closed span put back after a failed export.
    Encoded(ProtoSpan),
    /// A diagnostic event.
    Event(DiagEvent),
}

impl Item {
    fn is_event(&self) -> bool {
        matches!(self, Item::Event(_))
    }
}

#[derive(Debug, Default)]
struct Lanes {
    ordinary: VecDeque<Item>,
    priority: VecDeque<Item>,
}

/// The bounded queue between the app's threads and the export thread.
#[derive(Debug)]
pub(crate) struct ExportQueue {
    lanes: Mutex<Lanes>,
    ordinary_cap: usize,
    priority_cap: usize,
    /// Wake the exporter when this many ordinary items are waiting.
    batch: usize,
    pub(crate) wake: tokio::sync::Notify,
    dropped_spans: AtomicU64,
    dropped_events: AtomicU64,
    pub(crate) exported_spans: AtomicU64,
    pub(crate) exported_events: AtomicU64,
    /// Ordinary spans not exported because their trace was not sampled.
    pub(crate) sampled_out: AtomicU64,
    /// Open-span snapshots queued so far.
    pub(crate) snapshots: AtomicU64,
    /// Items of the batch being exported.
    pub(crate) in_flight: AtomicUsize,
    closing: AtomicBool,
}

impl ExportQueue {
    pub(crate) fn new(ordinary_cap: usize, batch: usize) -> Self {
        let ordinary_cap = ordinary_cap.max(1);
        Self {
            lanes: Mutex::new(Lanes::default()),
            ordinary_cap,
            priority_cap: ordinary_cap.max(1024),
            batch: batch.clamp(1, ordinary_cap),
            wake: tokio::sync::Notify::new(),
            dropped_spans: AtomicU64::new(0),
            dropped_events: AtomicU64::new(0),
            exported_spans: AtomicU64::new(0),
            exported_events: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
            sampled_out: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
        }
    }

    fn lanes(&self) -> std::sync::MutexGuard<'_, Lanes> {
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn count_drop(&self, item: &Item) {
        if item.is_event() {
            self.dropped_events.fetch_add(1, Ordering::Relaxed);
        } else {
            self.dropped_spans.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues an item that may be dropped when the lane is full.
    pub(crate) fn push_ordinary(&self, item: Item) {
        let mut lanes = self.lanes();
        if lanes.ordinary.len() >= self.ordinary_cap {
            drop(lanes);
            self.count_drop(&item);
            return;
        }
        lanes.ordinary.push_back(item);
        let wake = lanes.ordinary.len() == self.batch;
        drop(lanes);
        if wake {
            self.wake.notify_one();
        }
    }

    /// Queues an item that must get through: wakes the exporter at once.
    /// When the lane is full, the oldest snapshot makes room (a newer
    /// snapshot of the same span supersedes it anyway); failing that the
    /// item is dropped and counted.
    pub(crate) fn push_priority(&self, item: Item) {
        let mut lanes = self.lanes();
        if lanes.priority.len() >= self.priority_cap {
            match lanes
                .priority
                .iter()
                .position(|i| matches!(i, Item::Snapshot(_)))
            {
                Some(pos) => {
                    lanes.priority.remove(pos);
                    self.dropped_spans.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    drop(lanes);
                    self.count_drop(&item);
                    return;
                }
            }
        }
        lanes.priority.push_back(item);
        drop(lanes);
        self.wake.notify_one();
    }

    /// Puts items of a failed export back at the front of the priority lane
    /// (as far as it has room; the rest are dropped and counted).
    pub(crate) fn requeue_front(&self, items: Vec<Item>) {
        let mut lanes = self.lanes();
        for item in items.into_iter().rev() {
            if lanes.priority.len() >= self.priority_cap {
                self.count_drop(&item);
            } else {
                lanes.priority.push_front(item);
            }
        }
    }

    /// A closed span: priority lane if it was slow, failed or reported open.
    pub(crate) fn push_closed(&self, span: ClosedSpan) {
        if span.priority {
            self.push_priority(Item::Closed(span))
        } else {
            self.push_ordinary(Item::Closed(span))
        }
    }

    /// A diagnostic event: `Warn`/`Error` take the priority lane.
    pub(crate) fn push_event(&self, event: DiagEvent) {
        match event.severity {
            Severity::Info => self.push_ordinary(Item::Event(event)),
            Severity::Warn | Severity::Error => self.push_priority(Item::Event(event)),
        }
    }

    /// Takes up to `max` items, priority lane first.
    pub(crate) fn take(&self, max: usize) -> Vec<Item> {
        let mut lanes = self.lanes();
        let from_priority = lanes.priority.len().min(max);
        let mut out: Vec<Item> = lanes.priority.drain(..from_priority).collect();
        let from_ordinary = lanes.ordinary.len().min(max - out.len());
        out.extend(lanes.ordinary.drain(..from_ordinary));
        self.in_flight.store(out.len(), Ordering::Relaxed);
        out
    }

    pub(crate) fn is_empty(&self) -> bool {
        let lanes = self.lanes();
        lanes.ordinary.is_empty() && lanes.priority.is_empty()
    }

    /// Drop totals since start: (spans, events).
    pub(crate) fn dropped(&self) -> (u64, u64) {
        (
            self.dropped_spans.load(Ordering::Relaxed),
            self.dropped_events.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    pub(crate) fn stats(&self) -> ExportStats {
        let lanes = self.lanes();
        let queued = lanes.ordinary.len() + lanes.priority.len();
        drop(lanes);
        let (dropped_spans, dropped_events) = self.dropped();
        ExportStats {
            queued,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            snapshots: self.snapshots.load(Ordering::Relaxed),
            sampled_out_spans: self.sampled_out.load(Ordering::Relaxed),
            ordinary_capacity: self.ordinary_cap,
            priority_capacity: self.priority_cap,
            dropped_spans,
            dropped_events,
            exported_spans: self.exported_spans.load(Ordering::Relaxed),
            exported_events: self.exported_events.load(Ordering::Relaxed),
        }
    }
}

impl crate::spans::ClosedSpanSink for ExportQueue {
    fn closed(&self, span: ClosedSpan) {
        self.push_closed(span)
    }

    fn sampled_out(&self) {
        self.sampled_out.fetch_add(1, Ordering::Relaxed);
    }
}
