//! Names and OS thread ids of the threads we know, keyed by std `ThreadId`.
//!
//! parking_lot's deadlock detector identifies a deadlocked thread only by its
//! std [`ThreadId`], and std offers no way to find a thread's name from its
//! id. So threads register themselves here: every thread of a runtime built
//! by [`runtime_builder`](crate::runtime_builder) (on thread start), and the
//! library's own diagnostic threads. A thread that never registered (a host's
//! own `std::thread`) is reported by id only.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::thread::ThreadId;

/// What we know about a registered thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ThreadInfo {
    /// The thread's name, if it has one.
    pub(crate) name: Option<String>,
    /// The OS thread id (`gettid`).
    pub(crate) tid: i64,
}

static REGISTRY: Mutex<Option<HashMap<ThreadId, ThreadInfo>>> = Mutex::new(None);

/// The calling thread's OS thread id.
pub(crate) fn current_tid() -> i64 {
    // SAFETY: gettid has no preconditions and cannot fail.
    i64::from(unsafe { libc::gettid() })
}

/// Registers the calling thread (its name and OS tid).
pub(crate) fn register_current() {
    let thread = std::thread::current();
    let info = ThreadInfo {
        name: thread.name().map(str::to_owned),
        tid: current_tid(),
    };
    REGISTRY
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get_or_insert_with(HashMap::new)
        .insert(thread.id(), info);
}

/// Removes the calling thread from the registry.
pub(crate) fn unregister_current() {
    let id = std::thread::current().id();
    if let Some(map) = REGISTRY
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_mut()
    {
        map.remove(&id);
    }
}

/// What is known about the thread `id`, if it registered.
#[cfg_attr(not(feature = "deadlock-detection"), allow(dead_code))]
pub(crate) fn lookup(id: ThreadId) -> Option<ThreadInfo> {
    REGISTRY
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .and_then(|map| map.get(&id).cloned())
}

/// A std `ThreadId` as a number (`ThreadId::as_u64` is unstable; its `Debug`
/// form is `ThreadId(N)`). `0` if the form ever changes.
#[cfg_attr(not(feature = "deadlock-detection"), allow(dead_code))]
pub(crate) fn thread_id_u64(id: ThreadId) -> u64 {
    let text = format!("{id:?}");
    text.trim_start_matches("ThreadId(")
        .trim_end_matches(')')
        .parse()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_threads_are_found_by_std_id_and_removed() {
        let handle = std::thread::Builder::new()
            .name("reg-test".into())
            .spawn(|| {
                register_current();
                let me = std::thread::current().id();
                let found = lookup(me).expect("registered");
                unregister_current();
                (found, lookup(me), current_tid())
            })
            .unwrap();
        let (found, after, tid) = handle.join().unwrap();
        assert_eq!(found.name.as_deref(), Some("reg-test"));
        assert_eq!(found.tid, tid);
        assert_eq!(after, None);
    }

    #[test]
    fn thread_ids_print_as_numbers() {
        let id = std::thread::current().id();
        assert_ne!(thread_id_u64(id), 0);
        assert_eq!(
            format!("ThreadId({})", thread_id_u64(id)),
            format!("{id:?}")
        );
    }
}
