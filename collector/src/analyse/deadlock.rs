//! Pass 4, sync deadlock: the parking_lot cycles `check_deadlock()` found
//! (`kms.deadlock`), one finding per distinct cycle however often it was
//! reported.

use std::collections::BTreeMap;

use serde::Serialize;

use super::attrs::{i64_of, json_of};
use super::{Context, Pass};
use crate::store::ReadError;

/// One thread of a deadlock cycle.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct DeadlockThread {
    /// OS thread id.
    pub thread_id: i64,
    /// OS thread name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread_name: Option<String>,
    /// The first backtrace frame outside the locking machinery: where it
    /// waits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_at: Option<String>,
}

/// One distinct cycle.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadlockCycle {
    /// The threads.
    pub threads: Vec<DeadlockThread>,
    /// First report.
    pub first_ns: i64,
    /// Last report.
    pub last_ns: i64,
    /// Reports of this cycle.
    pub reports: usize,
}

/// What the deadlock pass found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DeadlockFindings {
    /// Distinct cycles, oldest first.
    pub cycles: Vec<DeadlockCycle>,
}

/// The pass.
#[derive(Debug)]
pub(crate) struct Deadlock;

impl Pass for Deadlock {
    fn name(&self) -> &'static str {
        "deadlock"
    }

    fn run(&self, cx: &mut Context<'_>) -> Result<(), ReadError> {
        let events = cx.reader.events("kms.deadlock", cx.window)?;
        let mut cycles: BTreeMap<Vec<i64>, DeadlockCycle> = BTreeMap::new();
        for e in &events {
            let threads: Vec<DeadlockThread> = json_of(&e.attributes, "deadlock.threads")
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default()
                .iter()
                .map(|t| DeadlockThread {
                    thread_id: i64_of(t, "thread_id").unwrap_or(0),
                    thread_name: t
                        .get("thread_name")
                        .and_then(|n| n.as_str())
                        .map(str::to_owned),
                    waiting_at: t
                        .get("backtrace")
                        .and_then(|b| b.as_str())
                        .and_then(waiting_frame),
                })
                .collect();
            let mut key: Vec<i64> = threads.iter().map(|t| t.thread_id).collect();
            key.sort_unstable();
            if key.is_empty() {
                // A cycle with no parsable threads still counts, once per report.
                key.push(-(i64_of(&e.attributes, "deadlock.cycle").unwrap_or(0) + 1));
            }
            let c = cycles.entry(key).or_insert_with(|| DeadlockCycle {
                threads: threads.clone(),
                first_ns: e.time_ns,
                last_ns: e.time_ns,
                reports: 0,
            });
            c.last_ns = e.time_ns;
            c.reports += 1;
        }
        let mut cycles: Vec<DeadlockCycle> = cycles.into_values().collect();
        cycles.sort_by_key(|c| c.first_ns);
        cx.diagnosis.deadlock = DeadlockFindings { cycles };
        Ok(())
    }
}

/// Frames of the lock machinery and the runtime, skipped when looking for
/// the caller that waits.
const MACHINERY: [&str; 12] = [
    "parking_lot",
    "lock_api",
    "backtrace",
    "std::",
    "core::",
    "alloc::",
    "tokio::",
    "__rust",
    "rust_begin",
    "clone3",
    "start_thread",
    "instrumented_kms::",
];

/// The first frame (function name) in a backtrace that is not lock or
/// runtime machinery.
fn waiting_frame(bt: &str) -> Option<String> {
    bt.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("at "))
        .map(|l| {
            // "12: crate::module::function" or "crate::module::function"
            l.split_once(": ")
                .filter(|(n, _)| n.trim().chars().all(|c| c.is_ascii_digit()))
                .map_or(l, |(_, f)| f)
                .trim()
        })
        .find(|f| !f.is_empty() && !MACHINERY.iter().any(|m| f.contains(m)))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::waiting_frame;

    #[test]
    fn waiting_frame_skips_lock_machinery() {
        let bt = "0: parking_lot_core::parking_lot::park\n at /x.rs:1\n\
                  1: lock_api::mutex::Mutex<R,T>::lock\n\
                  2: kms_twin::fault::take_b_then_a\n at src/fault.rs:10\n";
        assert_eq!(
            waiting_frame(bt).as_deref(),
            Some("kms_twin::fault::take_b_then_a")
        );
        assert_eq!(waiting_frame("0: parking_lot::x\n"), None);
    }
}
