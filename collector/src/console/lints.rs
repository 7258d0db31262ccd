//! tokio-console's task lints, computed the way `tokio-console` computes them
//! (`tokio-console/src/warnings.rs`), plus one of ours (`long-poll`).
//!
//! | name | fires when | from |
//! |---|---|---|
//! | `self-wakes` | more than 50 % of the task's wakes were self-wakes | tokio-console |
//! | `lost-waker` | not completed, not running, not woken, and no waker left: nothing can wake it | tokio-console |
//! | `never-yielded` | running its first poll for at least 1 s | tokio-console |
//! | `auto-boxed-future` | the runtime boxed the future because of its size | tokio-console |
//! | `large-future` | the future takes at least 1024 bytes | tokio-console |
//! | `long-poll` | the poll under way has run for at least 1 s, whatever the poll count: the task blocks its worker | ours |
//!
//! Blocking tasks (`spawn_blocking`, `block_on`) are exempt from all but the
//! size lints, as in tokio-console.

use std::time::Duration;

use super::state::TaskView;

/// Lint name: the task wakes itself more than the threshold.
pub const SELF_WAKES: &str = "self-wakes";
/// Lint name: the task can never be woken again.
pub const LOST_WAKER: &str = "lost-waker";
/// Lint name: the task's first poll has run past the threshold.
pub const NEVER_YIELDED: &str = "never-yielded";
/// Lint name: the runtime boxed the task's future.
pub const AUTO_BOXED_FUTURE: &str = "auto-boxed-future";
/// Lint name: the task's future is large.
pub const LARGE_FUTURE: &str = "large-future";
/// Lint name (ours): the poll under way has run past the threshold.
pub const LONG_POLL: &str = "long-poll";

/// The thresholds of the lints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lints {
    pub(crate) self_wake_percent: u64,
    pub(crate) poll_threshold: Duration,
    pub(crate) large_future_bytes: u64,
}

impl Lints {
    /// The warnings that apply to `task` at `now_ns`.
    pub(crate) fn check(&self, task: &TaskView<'_>, now_ns: i64) -> Vec<String> {
        let mut warnings = Vec::new();
        let blocking = task.is_blocking();
        let threshold_ns = i64::try_from(self.poll_threshold.as_nanos()).unwrap_or(i64::MAX);
        if !blocking && task.self_wake_percent() > self.self_wake_percent {
            warnings.push(SELF_WAKES);
        }
        if !blocking
            && !task.is_completed()
            && task.waker_count() == 0
            && !task.is_running()
            && !task.is_awakened()
        {
            warnings.push(LOST_WAKER);
        }
        if !blocking
            && task.is_running()
            && !task.is_completed()
            && task.polls() <= 1
            && task.busy_ns(now_ns) >= threshold_ns
        {
            warnings.push(NEVER_YIELDED);
        }
        if let (Some(size), Some(original)) = (task.size_bytes(), task.original_size_bytes()) {
            if size != original {
                warnings.push(AUTO_BOXED_FUTURE);
            }
        }
        if !blocking
            && task
                .size_bytes()
                .is_some_and(|s| s >= self.large_future_bytes)
        {
            warnings.push(LARGE_FUTURE);
        }
        if !blocking
            && !task.is_completed()
            && task
                .current_poll_ns(now_ns)
                .is_some_and(|d| d >= threshold_ns)
        {
            warnings.push(LONG_POLL);
        }
        warnings.into_iter().map(str::to_owned).collect()
    }
}
