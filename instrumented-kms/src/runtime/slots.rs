//! Per-worker poll slots: what each runtime thread is polling, readable from
//! another OS thread without locks.
//!
//! The poll hooks ([`before_poll`], [`after_poll`]) run on every task poll, so
//! they do the least that lets the watchdog find a poll that never returns:
//! the thread caches a pointer to its own slot in a thread-local, stores the
//! task id, and bumps a sequence number (odd while a poll runs). No clock is
//! read on the poll path: the watchdog timestamps a sequence value when it
//! first sees it, so a poll's duration is known to within one watchdog check.
//!
//! A slot is claimed on the thread's first poll (blocking-pool threads that
//! never poll a task take none) and released when the thread stops.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use tokio::runtime::TaskMeta;

use super::threads::current_tid;
use super::tokio_id_u64;

/// How many runtime threads can be watched at once; threads beyond this are
/// not watched (their polls are invisible to the poll-stall check; the
/// heartbeat still covers them).
pub(crate) const MAX_SLOTS: usize = 256;

/// One thread's slot. Aligned to a cache line so that workers writing their
/// own slots do not contend.
#[repr(align(64))]
pub(crate) struct Slot {
    /// 0 when free, else the id of the runtime whose thread owns the slot.
    runtime: AtomicU64,
    /// Poll sequence: odd while a poll is in progress.
    seq: AtomicU64,
    /// Id of the task being (or last) polled.
    task: AtomicU64,
    /// Who owns it (cold: written once per thread, read when reporting).
    owner: Mutex<Option<SlotOwner>>,
}

/// The thread owning a slot.
#[derive(Debug, Clone)]
pub(crate) struct SlotOwner {
    /// OS thread id.
    pub(crate) tid: i64,
    /// Thread name.
    pub(crate) name: Option<String>,
    /// std thread id, to match tokio's `worker_thread_id`.
    pub(crate) thread_id: std::thread::ThreadId,
}

impl Slot {
    const fn new() -> Self {
        Self {
            runtime: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            task: AtomicU64::new(0),
            owner: Mutex::new(None),
        }
    }
}

static SLOTS: [Slot; MAX_SLOTS] = [const { Slot::new() }; MAX_SLOTS];
/// Where threads that found no free slot (or no runtime) write, unobserved.
static OVERFLOW: Slot = Slot::new();

thread_local! {
    static MY_SLOT: Cell<Option<&'static Slot>> = const { Cell::new(None) };
}

/// tokio `on_before_task_poll` hook.
#[inline]
pub(crate) fn before_poll(meta: &TaskMeta<'_>) {
    let task = tokio_id_u64(meta.id());
    MY_SLOT.with(|cell| {
        let slot = match cell.get() {
            Some(slot) => slot,
            None => {
                let slot = claim();
                cell.set(Some(slot));
                slot
            }
        };
        // Only this thread writes its slot: load + store, no read-modify-write.
        slot.task.store(task, Ordering::Relaxed);
        let seq = slot.seq.load(Ordering::Relaxed);
        slot.seq.store(seq | 1, Ordering::Release);
    });
}

/// tokio `on_after_task_poll` hook.
#[inline]
pub(crate) fn after_poll(_meta: &TaskMeta<'_>) {
    MY_SLOT.with(|cell| {
        if let Some(slot) = cell.get() {
            let seq = slot.seq.load(Ordering::Relaxed);
            slot.seq.store((seq | 1) + 1, Ordering::Release);
        }
    });
}

#[cold]
fn claim() -> &'static Slot {
    let Some(runtime) = tokio::runtime::Handle::try_current()
        .ok()
        .map(|h| tokio_id_u64(h.id()))
    else {
        return &OVERFLOW;
    };
    let thread = std::thread::current();
    for slot in &SLOTS {
        if slot
            .runtime
            .compare_exchange(0, runtime, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            *slot.owner.lock().unwrap_or_else(PoisonError::into_inner) = Some(SlotOwner {
                tid: current_tid(),
                name: thread.name().map(str::to_owned),
                thread_id: thread.id(),
            });
            return slot;
        }
    }
    &OVERFLOW
}

/// Frees the calling thread's slot (tokio `on_thread_stop`).
pub(crate) fn release_current() {
    let slot = MY_SLOT.with(|cell| cell.take());
    if let Some(slot) = slot.filter(|s| !std::ptr::eq(*s, &OVERFLOW)) {
        *slot.owner.lock().unwrap_or_else(PoisonError::into_inner) = None;
        slot.seq.store(0, Ordering::Relaxed);
        slot.task.store(0, Ordering::Relaxed);
        slot.runtime.store(0, Ordering::Release);
    }
}

/// A consistent reading of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotView {
    /// Index in the table (stable while the thread lives).
    pub(crate) index: usize,
    /// The poll sequence number; identifies one poll while it runs.
    pub(crate) seq: u64,
    /// Task being polled.
    pub(crate) task: u64,
}

/// The slots of runtime `runtime` whose thread is inside a poll right now.
pub(crate) fn polling(runtime: u64, out: &mut Vec<SlotView>) {
    out.clear();
    for (index, slot) in SLOTS.iter().enumerate() {
        if slot.runtime.load(Ordering::Acquire) != runtime {
            continue;
        }
        let seq = slot.seq.load(Ordering::Acquire);
        if seq & 1 == 0 {
            continue;
        }
        let task = slot.task.load(Ordering::Relaxed);
        // The task id is written before the odd sequence number; if the
        // sequence moved meanwhile, this poll is over anyway.
        if slot.seq.load(Ordering::Acquire) == seq {
            out.push(SlotView { index, seq, task });
        }
    }
}

/// Whether the poll `view` is still the one running in its slot.
pub(crate) fn still_polling(view: &SlotView, runtime: u64) -> bool {
    let slot = &SLOTS[view.index];
    slot.runtime.load(Ordering::Acquire) == runtime && slot.seq.load(Ordering::Acquire) == view.seq
}

/// The thread owning slot `index`.
pub(crate) fn owner(index: usize) -> Option<SlotOwner> {
    SLOTS
        .get(index)?
        .owner
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    #[test]
    fn a_running_poll_is_visible_with_its_task_and_thread() {
        let rt = crate::runtime_builder(Some(2)).build().unwrap();
        let runtime = tokio_id_u64(rt.handle().id());
        let (entered, wait_entered) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let task = rt.spawn(async move {
            entered.send(current_tid()).unwrap();
            // Blocks the worker inside this poll until the test lets go.
            released.recv().unwrap();
        });
        let task_id = tokio_id_u64(task.id());
        let tid = wait_entered.recv().unwrap();

        let mut views = Vec::new();
        polling(runtime, &mut views);
        let view = *views
            .iter()
            .find(|v| v.task == task_id)
            .expect("the blocked poll is visible");
        let owner = owner(view.index).expect("slot has an owner");
        assert_eq!(owner.tid, tid);
        assert!(owner.name.unwrap().starts_with("kms-worker-"));
        assert!(still_polling(&view, runtime));

        release.send(()).unwrap();
        rt.block_on(task).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while still_polling(&view, runtime) {
            assert!(Instant::now() < deadline, "poll end not seen");
            std::thread::yield_now();
        }
        // Another runtime's id sees nothing of this one.
        polling(runtime + 1_000_000, &mut views);
        assert!(views.iter().all(|v| v.task != task_id));
    }

    #[test]
    fn slots_are_released_when_the_runtime_shuts_down() {
        let rt = crate::runtime_builder(Some(1)).build().unwrap();
        let runtime = tokio_id_u64(rt.handle().id());
        rt.block_on(rt.spawn(async {})).unwrap();
        let owned = || {
            SLOTS
                .iter()
                .filter(|s| s.runtime.load(Ordering::Acquire) == runtime)
                .count()
        };
        assert!(owned() >= 1);
        rt.shutdown_timeout(Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(5);
        while owned() > 0 {
            assert!(Instant::now() < deadline, "slots not released");
            std::thread::yield_now();
        }
    }
}
