//! Pass 5, async lock wait: tasks waiting on a tokio `Mutex`, `RwLock` or
//! `Semaphore` past the threshold (tokio-console async ops, recorded by
//! `serve --console`), and whether they wait on each other.
//!
//! tokio-console shows who *waits* on a lock, not who *holds* it. A cycle is
//! therefore inferred, not seen: two or more tasks each wait, past the
//! threshold, on a different lock that is held, and no stuck request is in
//! an outbound call (so no holder is merely waiting on I/O). That is what an
//! async deadlock between two handlers leaves behind, together with two
//! request spans open and idle inside the handler while the heartbeat stays
//! healthy; the verdict pass weighs those.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::attrs::{bool_of, i64_of, str_of};
use super::{Context, Pass, WaitsOn};
use crate::store::{ConsoleResourceRow, ReadError};

/// One task waiting on one lock.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LockWait {
    /// Console task id.
    pub task_id: i64,
    /// tokio task id, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokio_task_id: Option<i64>,
    /// Task name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_name: Option<String>,
    /// Where the task was spawned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spawn_location: Option<String>,
    /// Task state (`idle` while it waits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_state: Option<String>,
    /// Live wakers of the task (a waiter registered on the lock holds one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waker_count: Option<i64>,
    /// Console resource id of the lock.
    pub resource_id: i64,
    /// `Mutex`, `RwLock`, `Semaphore`.
    pub resource_type: String,
    /// Where the lock was created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_location: Option<String>,
    /// True when the lock was held (`locked`, or no permits left).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<bool>,
    /// The waiting operation, e.g. `Mutex::lock`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// How long it has waited.
    pub waited_ms: i64,
}

/// A lock held across the threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeldLock {
    /// Console resource id.
    pub resource_id: i64,
    /// `Mutex`, `RwLock`, `Semaphore`.
    pub resource_type: String,
    /// Where it was created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Held at least since this snapshot.
    pub held_since_ns: i64,
}

/// What the lock-wait pass found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LockWaitFindings {
    /// Console snapshots in the window (0: console data missing).
    pub console_snapshots: usize,
    /// The snapshot judged (the newest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_ns: Option<i64>,
    /// Waits past the threshold in that snapshot, one per task.
    pub waits: Vec<LockWait>,
    /// Threshold used.
    pub threshold_ms: i64,
    /// True when the waits look like a cycle (see the module docs).
    pub cycle_suspected: bool,
    /// Why, or why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cycle_reason: Option<String>,
    /// Locks held both in the judged snapshot and in the newest snapshot at
    /// least the threshold earlier (one per lock; internal semaphores count
    /// as their parent lock).
    pub held_locks: Vec<HeldLock>,
    /// Idle tasks with a live waker (registered on something that may wake
    /// them) in the judged snapshot.
    pub idle_tasks_with_wakers: usize,
    /// Live (not completed) tasks in the judged snapshot.
    pub live_tasks: usize,
    /// Tasks waiting on a held lock for less than the threshold so far.
    pub waits_below_threshold: usize,
    /// Tasks console flags with `lost-waker`.
    pub lost_waker_tasks: Vec<i64>,
    /// What the KMS's console did not record in the window, from its
    /// `kms.console` reports: its view of tasks and locks is partial when
    /// any of these is above zero.
    pub console_gaps: ConsoleGaps,
}

/// Tasks, resources and events the KMS's console left out (`kms.console`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ConsoleGaps {
    /// Tasks not recorded because the console held its maximum
    /// (`KMS_DIAG_CONSOLE_MAX_TASKS`).
    pub refused_tasks: i64,
    /// Resources (locks, semaphores, channels) not recorded, likewise.
    pub refused_resources: i64,
    /// Events dropped from the console's full event buffer (spawns, polls,
    /// wakes).
    pub dropped_events: i64,
}

impl ConsoleGaps {
    /// Adds up the `kms.console` reports of a window.
    fn from_reports(reports: &[crate::store::EventRow]) -> Self {
        let sum = |key| {
            reports
                .iter()
                .filter_map(|e| i64_of(&e.attributes, key))
                .map(|n| n.max(0))
                .fold(0i64, i64::saturating_add)
        };
        Self {
            refused_tasks: sum("console.refused_tasks"),
            refused_resources: sum("console.refused_resources"),
            dropped_events: sum("console.dropped_events"),
        }
    }

    /// True when the console recorded everything it was sent.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// What was left out, as a clause ("did not record 30 tasks, dropped 12
    /// events"), or `None` when nothing was.
    pub fn describe(&self) -> Option<String> {
        let mut parts = Vec::new();
        if self.refused_tasks > 0 || self.refused_resources > 0 {
            parts.push(format!(
                "did not record {} tasks and {} resources (its cap, KMS_DIAG_CONSOLE_MAX_TASKS, was reached)",
                self.refused_tasks, self.refused_resources
            ));
        }
        if self.dropped_events > 0 {
            parts.push(format!(
                "dropped {} events from its full buffer",
                self.dropped_events
            ));
        }
        (!parts.is_empty()).then(|| parts.join(" and "))
    }
}

/// The pass.
#[derive(Debug)]
pub(crate) struct LockWaitPass;

fn lock_rank(r: &ConsoleResourceRow) -> Option<u8> {
    let t = format!(
        "{} {}",
        r.concrete_type.as_deref().unwrap_or(""),
        r.kind.as_deref().unwrap_or("")
    )
    .to_ascii_lowercase();
    // The console recorder stores `internal`; accept console's own spelling too.
    let internal = bool_of(&r.attributes, "internal")
        .or_else(|| bool_of(&r.attributes, "is_internal"))
        .unwrap_or(false);
    let rank = if t.contains("mutex") || t.contains("rwlock") {
        3
    } else if t.contains("semaphore") {
        2
    } else {
        return None;
    };
    Some(if internal { rank - 1 } else { rank })
}

/// Locks held in a snapshot (`locked`, or no permits left), internal
/// semaphores folded into their parent lock.
fn held_lock_ids(resources: &[ConsoleResourceRow]) -> BTreeSet<i64> {
    let by_id: BTreeMap<i64, &ConsoleResourceRow> =
        resources.iter().map(|r| (r.resource_id, r)).collect();
    resources
        .iter()
        .filter(|r| lock_rank(r).is_some())
        .filter(|r| {
            bool_of(&r.attributes, "locked")
                .or_else(|| i64_of(&r.attributes, "permits").map(|p| p == 0))
                == Some(true)
        })
        .map(|r| {
            let mut id = r.resource_id;
            for _ in 0..8 {
                match by_id
                    .get(&id)
                    .and_then(|r| i64_of(&r.attributes, "parent_resource_id"))
                    .filter(|p| by_id.get(p).is_some_and(|p| lock_rank(p).is_some()))
                {
                    Some(p) => id = p,
                    None => break,
                }
            }
            id
        })
        .collect()
}

impl Pass for LockWaitPass {
    fn name(&self) -> &'static str {
        "lock_wait"
    }

    fn run(&self, cx: &mut Context<'_>) -> Result<(), ReadError> {
        let threshold_ms =
            i64::try_from(cx.config.lock_wait_threshold.as_millis()).unwrap_or(i64::MAX);
        let times = cx.reader.console_snapshot_times(cx.window)?;
        let mut f = LockWaitFindings {
            console_snapshots: times.len(),
            threshold_ms,
            console_gaps: ConsoleGaps::from_reports(&cx.reader.events("kms.console", cx.window)?),
            ..LockWaitFindings::default()
        };
        let Some(&latest) = times.last() else {
            cx.diagnosis.lock_wait = f;
            return Ok(());
        };
        let snap = cx.reader.console_snapshot(latest)?;
        f.snapshot_ns = Some(latest);
        f.live_tasks = snap.tasks.iter().filter(|t| t.state != "completed").count();
        f.lost_waker_tasks = snap
            .tasks
            .iter()
            .filter(|t| {
                t.warnings
                    .iter()
                    .any(|w| w.contains("lost-waker") || w.contains("lost waker"))
            })
            .map(|t| t.task_id)
            .collect();
        let resources: BTreeMap<i64, (&ConsoleResourceRow, u8)> = snap
            .resources
            .iter()
            .filter_map(|r| lock_rank(r).map(|rank| (r.resource_id, (r, rank))))
            .collect();
        let tasks: BTreeMap<i64, _> = snap.tasks.iter().map(|t| (t.task_id, t)).collect();
        // A tokio Mutex or RwLock waits through an internal Semaphore whose
        // parent is the lock: count a wait on the child as a wait on the lock.
        let top_lock = |mut rid: i64| {
            for _ in 0..8 {
                match resources
                    .get(&rid)
                    .and_then(|(r, _)| i64_of(&r.attributes, "parent_resource_id"))
                    .filter(|p| resources.contains_key(p))
                {
                    Some(parent) => rid = parent,
                    None => break,
                }
            }
            rid
        };
        // One wait per task: the most specific lock it waits on.
        let mut per_task: BTreeMap<i64, (u8, LockWait)> = BTreeMap::new();
        for op in &snap.async_ops {
            let (Some(task_id), Some(rid)) = (op.task_id, op.resource_id) else {
                continue;
            };
            let rid = top_lock(rid);
            let Some(&(res, rank)) = resources.get(&rid) else {
                continue;
            };
            let waited_ns = op.busy_ns.unwrap_or(0) + op.idle_ns.unwrap_or(0);
            let waited_ms = waited_ns / 1_000_000;
            let held = bool_of(&res.attributes, "locked")
                .or_else(|| i64_of(&res.attributes, "permits").map(|p| p == 0));
            if waited_ms < threshold_ms {
                if held != Some(false) {
                    f.waits_below_threshold += 1;
                }
                continue;
            }
            let task = tasks.get(&task_id);
            let wait = LockWait {
                task_id,
                tokio_task_id: task.and_then(|t| t.tokio_task_id),
                task_name: task.and_then(|t| t.name.clone()),
                spawn_location: task.and_then(|t| t.spawn_location.clone()),
                task_state: task.map(|t| t.state.clone()),
                waker_count: task.and_then(|t| t.waker_count),
                resource_id: rid,
                resource_type: res
                    .concrete_type
                    .clone()
                    .or_else(|| res.kind.clone())
                    .unwrap_or_else(|| "lock".into()),
                resource_location: res
                    .location
                    .clone()
                    .or_else(|| str_of(&res.attributes, "location")),
                held,
                source: op.source.clone(),
                waited_ms,
            };
            match per_task.get(&task_id) {
                Some((r, w)) if (*r, w.waited_ms) >= (rank, waited_ms) => {}
                _ => {
                    per_task.insert(task_id, (rank, wait));
                }
            }
        }
        f.waits = per_task.into_values().map(|(_, w)| w).collect();
        f.idle_tasks_with_wakers = snap
            .tasks
            .iter()
            .filter(|t| t.state == "idle" && t.waker_count.unwrap_or(0) > 0)
            .count();
        // Locks held now and at least one threshold ago.
        let threshold_ns = threshold_ms.saturating_mul(1_000_000);
        let earlier = times
            .iter()
            .rev()
            .find(|t| **t <= latest.saturating_sub(threshold_ns))
            .copied();
        if let Some(earlier) = earlier {
            let before = cx.reader.console_snapshot(earlier)?;
            let held_then: BTreeSet<i64> = held_lock_ids(&before.resources);
            for id in held_lock_ids(&snap.resources).intersection(&held_then) {
                if let Some((r, _)) = resources.get(id) {
                    f.held_locks.push(HeldLock {
                        resource_id: *id,
                        resource_type: r.concrete_type.clone().unwrap_or_else(|| "lock".into()),
                        location: r.location.clone(),
                        held_since_ns: earlier,
                    });
                }
            }
        }
        let held_waits: Vec<&LockWait> = f.waits.iter().filter(|w| w.held != Some(false)).collect();
        let locks: BTreeSet<i64> = held_waits.iter().map(|w| w.resource_id).collect();
        let outbound_stuck = cx
            .diagnosis
            .stuck
            .iter()
            .filter(|s| s.waits_on != WaitsOn::Handler)
            .count();
        let handler_stuck = cx
            .diagnosis
            .stuck
            .iter()
            .filter(|s| s.waits_on == WaitsOn::Handler)
            .count();
        // When the recording misses waiters (no async op at all, or a task
        // view with fewer live tasks than stuck requests), the locks still
        // tell: two locks held across the threshold, requests idle in the
        // handler, tasks idle with wakers (or, with a blind task view, the
        // idle request spans) and no request in I/O is what two handlers
        // waiting on each other leave.
        let blind = f.live_tasks < handler_stuck;
        let tasks_agree = f.idle_tasks_with_wakers >= 2 || blind;
        let held_cycle = f.held_locks.len() >= 2
            && handler_stuck >= 2
            && tasks_agree
            && outbound_stuck == 0
            && (f.waits.is_empty() || blind);
        let waits_cycle = locks.len() >= 2 && held_waits.len() >= 2 && outbound_stuck == 0;
        (f.cycle_suspected, f.cycle_reason) = if held_cycle && !waits_cycle {
            (
                true,
                Some(format!(
                    "{} locks held for over {} ms ({}) while {handler_stuck} requests are idle in the handler ({} console tasks idle with wakers) and no request is in an outbound call: the holders wait on each other (tokio-console recorded {} of the waiters)",
                    f.held_locks.len(),
                    threshold_ms,
                    f.held_locks
                        .iter()
                        .map(|l| format!("{} {}", l.resource_type, l.resource_id))
                        .collect::<Vec<_>>()
                        .join(", "),
                    f.idle_tasks_with_wakers,
                    if f.waits.is_empty() { "none".to_owned() } else { format!("only {}", f.waits.len()) }
                )),
            )
        } else if f.waits.is_empty() {
            (false, None)
        } else if locks.len() < 2 || held_waits.len() < 2 {
            (
                false,
                Some(format!(
                    "{} task(s) wait on {} held lock(s): contention, not a cycle (a cycle needs two tasks each waiting on a different held lock)",
                    held_waits.len(),
                    locks.len()
                )),
            )
        } else if outbound_stuck > 0 {
            (
                false,
                Some(format!(
                    "{} tasks wait on {} different held locks, but {outbound_stuck} stuck request(s) sit in outbound calls and may hold them",
                    held_waits.len(),
                    locks.len()
                )),
            )
        } else {
            (
                true,
                Some(format!(
                    "{} tasks wait on {} different held locks ({}) and no stuck request is in an outbound call: each lock's holder is itself waiting",
                    held_waits.len(),
                    locks.len(),
                    locks
                        .iter()
                        .map(|id| format!("resource {id}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            )
        };
        cx.diagnosis.lock_wait = f;
        Ok(())
    }
}
