//! What the console records, and how many tasks and resources it may hold.
//!
//! console-subscriber keeps every task and resource it has seen until the
//! retention period after it completed. Its memory therefore grows with the
//! rate at which connections come and go: a KMS answering 120 new TLS
//! connections a second held 1.87 GB of completed tasks with 60 s of
//! retention, about 50 KB each (mostly two poll-time histograms per task).
//! A rate is not a setting an operator controls; a count is. So the console
//! admits a task (or resource) only while fewer than
//! [`ConsoleConfig::max_tasks`](super::ConsoleConfig) are live or completed
//! within the retention period. The others are never seen by the console
//! (not by its event buffer either, so they cost almost nothing) and are
//! counted: `kms.console` reports them as `console.refused_tasks` and
//! `console.refused_resources`.
//!
//! What is lost when the cap is reached: the tasks spawned after it, until
//! older ones complete and age out. Live tasks stay admitted, so a request
//! stuck since before the flood stays visible; one that started during the
//! flood may not be. The collector's report says how many were refused.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::subscriber::Interest;
use tracing::{span, Metadata};
use tracing_subscriber::layer::{Context, Filter};

/// How late console-subscriber may drop a completed entity after its
/// retention: it cleans up once per publish interval (1 s).
const CLEANUP_SLACK: Duration = Duration::from_secs(1);

/// The console layer's per-layer filter: tokio's instrumentation only (no
/// timers unless asked), tasks and resources within their budgets.
pub(crate) struct ConsoleFilter {
    timers: bool,
    budgets: Arc<Budgets>,
}

/// The task budget and the resource budget.
struct Budgets {
    tasks: Budget,
    resources: Budget,
}

/// Reads what a [`ConsoleFilter`] refused, from another thread.
#[derive(Clone)]
pub(crate) struct RefusedCounter(Arc<Budgets>);

impl RefusedCounter {
    /// Tasks and resources refused so far.
    pub(crate) fn get(&self) -> Refused {
        Refused {
            tasks: self.0.tasks.refused.load(Ordering::Relaxed),
            resources: self.0.resources.refused.load(Ordering::Relaxed),
        }
    }
}

impl ConsoleFilter {
    /// A filter admitting at most `max` tasks and `max` resources that are
    /// live or completed within `retention`.
    pub(crate) fn new(timers: bool, max: usize, retention: Duration) -> Self {
        let keep_closed = retention.saturating_add(CLEANUP_SLACK);
        Self {
            timers,
            budgets: Arc::new(Budgets {
                tasks: Budget::new(max, keep_closed),
                resources: Budget::new(max, keep_closed),
            }),
        }
    }

    /// A reader of this filter's refusals.
    pub(crate) fn refused_counter(&self) -> RefusedCounter {
        RefusedCounter(Arc::clone(&self.budgets))
    }

    fn budget(&self, meta: &Metadata<'_>) -> Option<&Budget> {
        match classify(meta) {
            Entity::Task => Some(&self.budgets.tasks),
            Entity::Resource => Some(&self.budgets.resources),
            Entity::Other => None,
        }
    }
}

/// Running totals of what the console did not record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Refused {
    /// Tasks spawned while the task budget was full.
    pub(crate) tasks: u64,
    /// Resources created while the resource budget was full.
    pub(crate) resources: u64,
}

impl<S> Filter<S> for ConsoleFilter
where
    S: tracing::Subscriber + for<'lookup> tracing_subscriber::registry::LookupSpan<'lookup>,
{
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        if !wanted(meta, self.timers) {
            return false;
        }
        self.budget(meta).is_none_or(Budget::admit)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if !wanted(meta, self.timers) {
            Interest::never()
        } else if self.budget(meta).is_some() {
            // Asked again at every spawn: the answer depends on the budget.
            Interest::sometimes()
        } else {
            Interest::always()
        }
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, _: &span::Id, _: Context<'_, S>) {
        if let Some(budget) = self.budget(attrs.metadata()) {
            budget.live.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_close(&self, id: span::Id, cx: Context<'_, S>) {
        let Some(meta) = cx.metadata(&id) else {
            return;
        };
        if let Some(budget) = self.budget(meta) {
            budget.closed(Instant::now());
        }
    }
}

/// What console-subscriber's own `spawn` lets through (tokio's runtime
/// spans and events), less timers unless `timers`. Depends on the callsite
/// only.
pub(crate) fn wanted(meta: &Metadata<'_>, timers: bool) -> bool {
    let tokio = if meta.is_event() {
        meta.target().starts_with("runtime::") || meta.target().starts_with("tokio")
    } else {
        meta.name().starts_with("runtime.") || meta.target().starts_with("tokio")
    };
    tokio && (timers || !is_timer(meta))
}

/// tokio's timer instrumentation: the resource, async-op and state-update
/// callsites of `Sleep` and `Interval` (their targets name the kind of
/// record, their module the kind of resource).
fn is_timer(meta: &Metadata<'_>) -> bool {
    meta.module_path()
        .is_some_and(|m| m.starts_with("tokio::time"))
}

/// Which of console-subscriber's entities a callsite creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entity {
    Task,
    Resource,
    Other,
}

/// The span names console-subscriber recognises as tasks and resources.
fn classify(meta: &Metadata<'_>) -> Entity {
    if !meta.is_span() {
        return Entity::Other;
    }
    match (meta.name(), meta.target()) {
        ("runtime.spawn", _) | ("task", "tokio::task") => Entity::Task,
        ("runtime.resource", _) => Entity::Resource,
        _ => Entity::Other,
    }
}

/// A count of admitted entities that are live or completed within the
/// retention period.
struct Budget {
    max: usize,
    keep_closed: Duration,
    live: AtomicUsize,
    /// `closed.len()`, readable without the lock.
    closed_len: AtomicUsize,
    /// Completion times still retained by the console, oldest first; never
    /// longer than `max`.
    closed: Mutex<VecDeque<Instant>>,
    refused: AtomicU64,
}

impl Budget {
    fn new(max: usize, keep_closed: Duration) -> Self {
        Self {
            max,
            keep_closed,
            live: AtomicUsize::new(0),
            closed_len: AtomicUsize::new(0),
            closed: Mutex::new(VecDeque::new()),
            refused: AtomicU64::new(0),
        }
    }

    fn held(&self) -> usize {
        self.live.load(Ordering::Relaxed) + self.closed_len.load(Ordering::Relaxed)
    }

    /// Whether one more fits; counts a refusal when not. Concurrent spawns
    /// may overshoot by one per thread.
    fn admit(&self) -> bool {
        if self.held() < self.max {
            return true;
        }
        // Full as last counted: forget completions the console has let go.
        self.expire(Instant::now());
        if self.held() < self.max {
            return true;
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        false
    }

    fn closed(&self, at: Instant) {
        let mut closed = self.closed.lock().unwrap_or_else(PoisonError::into_inner);
        self.live.fetch_sub(1, Ordering::Relaxed);
        closed.push_back(at);
        Self::expire_locked(&mut closed, at, self.keep_closed);
        self.closed_len.store(closed.len(), Ordering::Relaxed);
    }

    fn expire(&self, now: Instant) {
        let mut closed = self.closed.lock().unwrap_or_else(PoisonError::into_inner);
        Self::expire_locked(&mut closed, now, self.keep_closed);
        self.closed_len.store(closed.len(), Ordering::Relaxed);
    }

    fn expire_locked(closed: &mut VecDeque<Instant>, now: Instant, keep: Duration) {
        while closed
            .front()
            .is_some_and(|&at| now.saturating_duration_since(at) > keep)
        {
            closed.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::callsite::{Callsite, Identifier};
    use tracing::field::FieldSet;
    use tracing::metadata::Kind;
    use tracing::Level;

    struct TestCallsite;
    static CALLSITE: TestCallsite = TestCallsite;
    impl Callsite for TestCallsite {
        fn set_interest(&self, _: Interest) {}
        fn metadata(&self) -> &Metadata<'_> {
            unreachable!("only its identity is used")
        }
    }

    fn meta(
        name: &'static str,
        target: &'static str,
        module: &'static str,
        kind: Kind,
    ) -> Metadata<'static> {
        Metadata::new(
            name,
            target,
            Level::TRACE,
            None,
            None,
            Some(module),
            FieldSet::new(&[], Identifier(&CALLSITE)),
            kind,
        )
    }

    #[test]
    fn the_console_sees_tokio_only_and_timers_only_when_asked() {
        let spawn = meta(
            "runtime.spawn",
            "tokio::task",
            "tokio::task::spawn",
            Kind::SPAN,
        );
        let waker = meta(
            "event",
            "tokio::task::waker",
            "tokio::runtime::task::waker",
            Kind::EVENT,
        );
        let mutex = meta(
            "runtime.resource",
            "tokio::sync::mutex",
            "tokio::sync::mutex",
            Kind::SPAN,
        );
        let mutex_op = meta(
            "event",
            "runtime::resource::poll_op",
            "tokio::sync::mutex",
            Kind::EVENT,
        );
        let sleep = meta(
            "runtime.resource",
            "tokio::time::sleep",
            "tokio::time::sleep",
            Kind::SPAN,
        );
        let sleep_state = meta(
            "event",
            "runtime::resource::state_update",
            "tokio::time::sleep",
            Kind::EVENT,
        );
        let app = meta(
            "kms.request",
            "instrumented_kms::rpc",
            "instrumented_kms::rpc",
            Kind::SPAN,
        );
        let app_event = meta(
            "event",
            "dstack_kms",
            "dstack_kms::main_service",
            Kind::EVENT,
        );
        for m in [&spawn, &waker, &mutex, &mutex_op] {
            assert!(wanted(m, false), "{}", m.target());
            assert!(wanted(m, true), "{}", m.target());
        }
        for m in [&sleep, &sleep_state] {
            assert!(!wanted(m, false), "{}", m.target());
            assert!(wanted(m, true), "{}", m.target());
        }
        for m in [&app, &app_event] {
            assert!(!wanted(m, false), "{}", m.target());
            assert!(!wanted(m, true), "{}", m.target());
        }
        assert_eq!(classify(&spawn), Entity::Task);
        assert_eq!(classify(&mutex), Entity::Resource);
        assert_eq!(classify(&waker), Entity::Other);
        assert_eq!(classify(&mutex_op), Entity::Other);
    }

    #[test]
    fn a_full_budget_refuses_until_completions_age_out() {
        let keep = Duration::from_secs(10);
        let budget = Budget::new(3, keep);
        for _ in 0..3 {
            assert!(budget.admit());
            budget.live.fetch_add(1, Ordering::Relaxed);
        }
        assert!(!budget.admit(), "three live of three");
        let t0 = Instant::now();
        budget.closed(t0);
        assert!(!budget.admit(), "a completed task is still retained");
        assert_eq!(budget.refused.load(Ordering::Relaxed), 2);
        // Past the retention, the completion no longer counts.
        budget.expire(t0 + keep + Duration::from_millis(1));
        assert_eq!(budget.held(), 2);
        assert!(budget.admit());
    }

    #[test]
    fn retained_completions_never_outnumber_the_budget() {
        let budget = Budget::new(4, Duration::from_secs(3600));
        let t0 = Instant::now();
        let mut admitted = 0;
        for i in 0..100u64 {
            if budget.admit() {
                admitted += 1;
                budget.live.fetch_add(1, Ordering::Relaxed);
                budget.closed(t0 + Duration::from_millis(i));
            }
        }
        assert_eq!(admitted, 4);
        assert_eq!(budget.refused.load(Ordering::Relaxed), 96);
        assert!(budget.closed.lock().unwrap().len() <= 4);
    }
}
