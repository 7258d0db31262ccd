//! The set of open spans (sharded, so app threads rarely contend) and the
//! per-OS-thread stacks of entered spans.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use super::record::SpanRecord;
use super::SpanRef;

const SHARDS: usize = 32;

/// Every span that is currently open, keyed by span id.
#[derive(Debug)]
pub(crate) struct OpenSpans {
    shards: Vec<Mutex<HashMap<u64, Arc<SpanRecord>>>>,
}

impl OpenSpans {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<SpanRecord>>> {
        // Span ids are random, so the low bits spread evenly.
        self.shards[(key as usize) % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn insert(&self, record: Arc<SpanRecord>) {
        let key = record.key();
        self.shard(key).insert(key, record);
    }

    pub(crate) fn remove(&self, record: &SpanRecord) {
        let key = record.key();
        self.shard(key).remove(&key);
    }

    /// Calls `f` with every open span (one shard locked at a time; `f` must be quick).
    #[allow(dead_code)]
    pub(crate) fn for_each(&self, mut f: impl FnMut(&Arc<SpanRecord>)) {
        for shard in &self.shards {
            let records: Vec<Arc<SpanRecord>> = shard
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .cloned()
                .collect();
            for r in &records {
                f(r);
            }
        }
    }

    /// Number of open spans.
    #[allow(dead_code)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// The stack of spans entered on one OS thread.
#[derive(Debug)]
struct ThreadStack {
    stack: Mutex<Vec<Arc<SpanRecord>>>,
}

type Threads = Mutex<HashMap<i32, Arc<ThreadStack>>>;

fn threads() -> &'static Threads {
    static THREADS: OnceLock<Threads> = OnceLock::new();
    THREADS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Registers the thread's stack on first use and removes it at thread exit.
struct LocalStack {
    tid: i32,
    stack: Arc<ThreadStack>,
}

impl LocalStack {
    fn new() -> Self {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let stack = Arc::new(ThreadStack {
            stack: Mutex::new(Vec::new()),
        });
        threads()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(tid, stack.clone());
        Self { tid, stack }
    }
}

impl Drop for LocalStack {
    fn drop(&mut self) {
        threads()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.tid);
    }
}

thread_local! {
    static LOCAL: LocalStack = LocalStack::new();
}

/// The calling thread entered `record`.
pub(crate) fn push(record: Arc<SpanRecord>) {
    let _ = LOCAL.try_with(|l| {
        l.stack
            .stack
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(record)
    });
}

/// The calling thread exited the span with key `key`.
pub(crate) fn pop(key: u64) {
    let _ = LOCAL.try_with(|l| {
        let mut stack = l.stack.stack.lock().unwrap_or_else(PoisonError::into_inner);
        // Usually the top; search from the top for out-of-order exits.
        if let Some(pos) = stack.iter().rposition(|r| r.key() == key) {
            stack.remove(pos);
        }
    });
}

pub(super) fn current_span_on_thread(tid: i32) -> Option<SpanRef> {
    let stack = threads()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&tid)
        .cloned()?;
    let top = stack
        .stack
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .last()
        .cloned()?;
    Some(SpanRef {
        name: top.name(),
        trace_id: top.trace_id,
        span_id: top.span_id,
    })
}
