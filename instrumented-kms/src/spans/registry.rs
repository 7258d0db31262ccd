//! The set of open spans (sharded, so app threads rarely contend) and the
//! per-OS-thread stacks of entered spans.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use super::record::SpanRecord;
use super::SpanRef;

const SHARDS: usize = 32;

/// Span ids are random: hash them as themselves.
#[derive(Debug, Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// Every span that is currently open, keyed by span id.
#[derive(Debug)]
pub(crate) struct OpenSpans {
    shards: Vec<Mutex<IdMap<Arc<SpanRecord>>>>,
}

impl OpenSpans {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(IdMap::default())).collect(),
        }
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, IdMap<Arc<SpanRecord>>> {
        // Span ids are random: the top bits pick the shard, the map uses the rest.
        self.shards[(key >> 59) as usize % SHARDS]
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

/// What a thread's stack keeps about an entered span: copies, so entering
/// touches no cache line shared with other threads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entered {
    /// The tracing span id (`Id::into_u64`), to match the exit.
    pub(crate) id: u64,
    pub(crate) name: &'static str,
    pub(crate) trace_id: [u8; 16],
    pub(crate) span_id: [u8; 8],
}

/// The stack of spans entered on one OS thread.
#[derive(Debug)]
struct ThreadStack {
    stack: Mutex<Vec<Entered>>,
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

/// The calling thread entered a span.
pub(crate) fn push(entered: Entered) {
    let _ = LOCAL.try_with(|l| {
        l.stack
            .stack
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(entered)
    });
}

/// The calling thread exited the span with tracing id `id`.
pub(crate) fn pop(id: u64) {
    let _ = LOCAL.try_with(|l| {
        let mut stack = l.stack.stack.lock().unwrap_or_else(PoisonError::into_inner);
        // Usually the top; search from the top for out-of-order exits.
        if let Some(pos) = stack.iter().rposition(|e| e.id == id) {
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
    let top = *stack
        .stack
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .last()?;
    Some(SpanRef {
        name: top.name.to_owned(),
        trace_id: top.trace_id,
        span_id: top.span_id,
    })
}
