//! The open-span reporter: a named OS thread that, every interval, exports a
//! snapshot of every span open longer than the threshold (see "Open-span
//! snapshot" in `docs/wire-format.md`).

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use super::registry::OpenSpans;
use crate::export::{encode, ExportQueue, Item};

/// Name of the reporter thread.
pub(crate) const THREAD_NAME: &str = "kms-diag-open-spans";

/// Owner of the reporter thread; stops it when dropped or shut down.
#[derive(Debug)]
pub(crate) struct ReporterHandle {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ReporterHandle {
    pub(crate) fn shutdown(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ReporterHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts the reporter.
pub(crate) fn spawn(
    open: Arc<OpenSpans>,
    queue: Arc<ExportQueue>,
    threshold: Duration,
    interval: Duration,
) -> std::io::Result<ReporterHandle> {
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = crate::quiet_thread::spawn(THREAD_NAME, move |ready| {
        ready.signal();
        while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
            report(&open, &queue, threshold);
        }
    })?;
    Ok(ReporterHandle {
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// One pass: a snapshot of every span open in a trace where some span is
/// older than `threshold`.
///
/// The younger spans of such a trace are reported too: a request stuck for
/// minutes may have entered its current call a moment ago (after a retry,
/// or after waiting for a permit), and that call is where it waits. Without
/// it, the request would look idle in its handler.
pub(crate) fn report(open: &OpenSpans, queue: &ExportQueue, threshold: Duration) -> usize {
    let now = SystemTime::now();
    let now_instant = Instant::now();
    let mut records = Vec::new();
    let mut stuck_traces = std::collections::HashSet::new();
    open.for_each(|record| {
        if now_instant.saturating_duration_since(record.start) >= threshold {
            stuck_traces.insert(record.trace_id);
        }
        records.push(record.clone());
    });
    let mut count = 0;
    for record in records
        .iter()
        .filter(|r| stuck_traces.contains(&r.trace_id))
    {
        let seq = record.snapshot_seq.fetch_add(1, Ordering::Relaxed) + 1;
        queue.snapshots.fetch_add(1, Ordering::Relaxed);
        queue.push_priority(Item::Snapshot(encode::snapshot(
            record,
            seq,
            now,
            now_instant,
        )));
        count += 1;
    }
    count
}
