//! parking_lot deadlock detection (feature `deadlock-detection`).
//!
//! A named OS thread (`kms-diag-deadlock`) calls
//! [`parking_lot::deadlock::check_deadlock`] every interval (default 10 s) and
//! exports each cycle found at once as a `kms.deadlock` event. A cycle is
//! reported once: parking_lot parks the deadlocked threads for good after
//! taking their backtraces, so later checks do not find them again.
//!
//! What a report can say about each thread: parking_lot gives the std
//! [`ThreadId`](std::thread::ThreadId) and a backtrace captured on the
//! deadlocked thread itself. std has no way to find a thread's name or OS id
//! from its `ThreadId`, so names and OS thread ids come from a registry that
//! the threads of a runtime built by [`runtime_builder`](crate::runtime_builder)
//! (and the library's own threads) join when they start. Threads the library
//! did not start are reported with their id and backtrace only.
//!
//! Latency: a cycle is found at the first check after it forms, but
//! `check_deadlock` returns only once every deadlocked thread has captured
//! and symbolized its backtrace. The first symbolization in a process loads
//! the binary's debug info: measured 1.2-4 s and about 120 MB RSS for a debug
//! test binary with full debuginfo on a loaded 2-core machine, 0.15 s once
//! loaded. A binary without debuginfo (the usual release build) pays far
//! less. We do not pre-load it: that memory would be spent in every run.
//!
//! Only locks from parking_lot (and crates built on it, with its
//! `deadlock_detection` feature on) are seen; std and tokio locks are not.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::event::{DiagEvent, Severity};
use crate::runtime::threads;
use crate::sink::EventSink;

/// Longest backtrace text kept per thread; the rest is cut (at a char boundary).
const MAX_BACKTRACE_BYTES: usize = 16 * 1024;

/// Deadlock checker settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeadlockConfig {
    /// How often to look for cycles. Default 10 s.
    pub(crate) interval: Duration,
}

impl DeadlockConfig {
    /// Default of [`DeadlockConfig::interval`].
    pub(crate) const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
}

impl Default for DeadlockConfig {
    fn default() -> Self {
        Self {
            interval: Self::DEFAULT_INTERVAL,
        }
    }
}

/// Starts the checker thread; it runs until `stop` receives a message or its
/// sender is dropped.
///
/// # Errors
///
/// The OS refused to start the thread.
pub(crate) fn spawn(
    config: DeadlockConfig,
    sink: EventSink,
    stop: Receiver<()>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("kms-diag-deadlock".into())
        .spawn(move || {
            threads::register_current();
            while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(config.interval) {
                for event in check() {
                    sink.emit(event);
                }
            }
            threads::unregister_current();
        })
}

/// One check: a `kms.deadlock` event per cycle found.
pub(crate) fn check() -> Vec<DiagEvent> {
    let cycles = parking_lot::deadlock::check_deadlock();
    cycles
        .iter()
        .enumerate()
        .map(|(index, cycle)| {
            let described: Vec<ThreadReport> = cycle
                .iter()
                .map(|t| ThreadReport::new(t.thread_id(), format!("{:?}", t.backtrace())))
                .collect();
            cycle_event(index, &described)
        })
        .collect()
}

/// One thread of a cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ThreadReport {
    thread_id: u64,
    name: Option<String>,
    tid: Option<i64>,
    backtrace: String,
}

impl ThreadReport {
    fn new(id: std::thread::ThreadId, mut backtrace: String) -> Self {
        let known = threads::lookup(id);
        if backtrace.len() > MAX_BACKTRACE_BYTES {
            let mut cut = MAX_BACKTRACE_BYTES;
            while !backtrace.is_char_boundary(cut) {
                cut -= 1;
            }
            backtrace.truncate(cut);
            backtrace.push_str("\n[...]");
        }
        Self {
            thread_id: threads::thread_id_u64(id),
            name: known.as_ref().and_then(|k| k.name.clone()),
            tid: known.map(|k| k.tid),
            backtrace,
        }
    }

    fn label(&self) -> String {
        match &self.name {
            Some(name) => format!("{name} (thread {})", self.thread_id),
            None => format!("thread {}", self.thread_id),
        }
    }
}

fn cycle_event(index: usize, threads: &[ThreadReport]) -> DiagEvent {
    let json: Vec<serde_json::Value> = threads
        .iter()
        .map(|t| {
            serde_json::json!({
                "thread_id": t.thread_id,
                "thread_name": t.name,
                "os_tid": t.tid,
                "backtrace": t.backtrace,
            })
        })
        .collect();
    let labels: Vec<String> = threads.iter().map(ThreadReport::label).collect();
    DiagEvent::new(
        "kms.deadlock",
        Severity::Error,
        format!(
            "parking_lot deadlock: {} threads wait on each other: {}.",
            threads.len(),
            labels.join(", ")
        ),
    )
    .attr("deadlock.cycle", index)
    .attr("deadlock.thread_count", threads.len())
    .attr(
        "deadlock.threads",
        serde_json::Value::Array(json).to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_promptly_when_its_stop_sender_is_dropped() {
        let (stop, stopped) = std::sync::mpsc::channel();
        let config = DeadlockConfig {
            interval: std::time::Duration::from_secs(60),
        };
        let thread = spawn(config, crate::sink::EventSink::new(|_| {}), stopped).unwrap();
        assert_eq!(thread.thread().name(), Some("kms-diag-deadlock"));
        let asked = std::time::Instant::now();
        drop(stop);
        let deadline = asked + std::time::Duration::from_secs(5);
        while !thread.is_finished() {
            assert!(std::time::Instant::now() < deadline, "thread did not stop");
            std::thread::yield_now();
        }
        // The interval is a minute; stopping does not wait for it.
        assert!(asked.elapsed() < std::time::Duration::from_secs(1));
    }
    use crate::event::AttrValue;

    #[test]
    fn a_cycle_event_carries_every_thread_as_json() {
        let threads = vec![
            ThreadReport {
                thread_id: 7,
                name: Some("kms-worker-1".into()),
                tid: Some(1234),
                backtrace: "frame \"a\"\n".into(),
            },
            ThreadReport {
                thread_id: 9,
                name: None,
                tid: None,
                backtrace: String::new(),
            },
        ];
        let event = cycle_event(0, &threads);
        assert_eq!(event.name, "kms.deadlock");
        assert_eq!(event.severity, Severity::Error);
        let json = event
            .attributes
            .iter()
            .find_map(|(k, v)| match (k, v) {
                (&"deadlock.threads", AttrValue::Str(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed[0]["thread_id"], 7);
        assert_eq!(parsed[0]["thread_name"], "kms-worker-1");
        assert_eq!(parsed[0]["os_tid"], 1234);
        assert_eq!(parsed[0]["backtrace"], "frame \"a\"\n");
        assert_eq!(parsed[1]["thread_name"], serde_json::Value::Null);
        assert!(event.body.contains("kms-worker-1 (thread 7)"));
        assert!(event.body.contains("thread 9"));
    }

    #[test]
    fn long_backtraces_are_cut() {
        let long = "é".repeat(MAX_BACKTRACE_BYTES);
        let report = ThreadReport::new(std::thread::current().id(), long);
        assert!(report.backtrace.len() <= MAX_BACKTRACE_BYTES + 6);
        assert!(report.backtrace.ends_with("[...]"));
    }
}
