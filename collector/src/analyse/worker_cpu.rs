//! What the runtime's worker threads did with the CPU over a window: the
//! `runtime.workers_cpu_*` attributes of heartbeat stalls and `kms.runtime`
//! samples (`docs/wire-format.md`).
//!
//! A heartbeat that lags with no poll stuck is produced by two different
//! things: tasks that keep every worker busy (the runtime stalls its own
//! heartbeat) and a host, hypervisor or cgroup that does not give the
//! workers a CPU (nothing wrong with the runtime). Time on a CPU against
//! time waiting in the kernel's run queue tells them apart.

use serde::Serialize;

use serde_json::Value;

use super::attrs::i64_of;

/// The workers' CPU accounting over one window, summed over workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WorkersCpu {
    /// Time the workers spent on a CPU.
    pub cpu_ms: i64,
    /// Time they were runnable but waited for a CPU (absent without the
    /// kernel's schedstat).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<i64>,
    /// The window's wall time.
    pub window_ms: i64,
}

/// What the workers did over the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuUse {
    /// On a CPU, summed over workers, for at least half of the window: the
    /// runtime spent that time running other tasks while the heartbeat was
    /// due, whatever the host took besides. One busy worker is enough:
    /// tokio keeps tasks that yield in a per-worker list no other worker
    /// steals from, so one worker can hold the heartbeat while the others
    /// sleep.
    Busy,
    /// Not busy, and waited for a CPU longer than they ran, for a quarter
    /// of the window or more: the host did not schedule them.
    Starved,
    /// Neither ran much nor waited: asleep (or the process was stopped).
    Asleep,
    /// Not busy, and the wait is unknown: cannot say.
    Unknown,
}

impl WorkersCpu {
    /// The accounting in `a`, if the producer sent it.
    pub(crate) fn from_attrs(a: &Value) -> Option<Self> {
        Some(Self {
            cpu_ms: i64_of(a, "runtime.workers_cpu_ms")?,
            wait_ms: i64_of(a, "runtime.workers_cpu_wait_ms"),
            window_ms: i64_of(a, "runtime.workers_cpu_window_ms").filter(|w| *w > 0)?,
        })
    }

    /// What the workers did over the window.
    pub fn classify(&self) -> CpuUse {
        if self.cpu_ms.saturating_mul(2) >= self.window_ms {
            return CpuUse::Busy;
        }
        match self.wait_ms {
            Some(wait) if wait > self.cpu_ms && wait.saturating_mul(4) >= self.window_ms => {
                CpuUse::Starved
            }
            Some(_) => CpuUse::Asleep,
            None => CpuUse::Unknown,
        }
    }

    /// "on a CPU 3900 ms and waiting for one 40 ms of 2000 ms (2 workers)".
    pub fn describe(&self, workers: Option<i64>) -> String {
        let wait = self
            .wait_ms
            .map(|w| format!(" and waiting for one {w} ms"))
            .unwrap_or_else(|| " (run-queue wait unknown)".into());
        let workers = workers
            .map(|w| format!(" ({w} workers)"))
            .unwrap_or_default();
        format!(
            "on a CPU {} ms{wait} of {} ms{workers}",
            self.cpu_ms, self.window_ms
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(cpu_ms: i64, wait_ms: Option<i64>, window_ms: i64) -> WorkersCpu {
        WorkersCpu {
            cpu_ms,
            wait_ms,
            window_ms,
        }
    }

    #[test]
    fn busy_workers_are_the_runtime_and_waiting_workers_the_host() {
        // Two workers spinning through a 2 s lag.
        assert_eq!(cpu(3900, Some(40), 2000).classify(), CpuUse::Busy);
        // One worker spinning, the other asleep (the lab's always-ready
        // tasks that yield: 13 s of CPU in a 12 s lag on two workers).
        assert_eq!(cpu(13064, Some(82), 12140).classify(), CpuUse::Busy);
        // Busy on a loaded host: ran less than they waited, but still ran
        // other tasks for most of the lag.
        assert_eq!(cpu(1600, Some(2400), 2000).classify(), CpuUse::Busy);
        // Ran a little, waited long: the host held it.
        assert_eq!(cpu(600, Some(1800), 2000).classify(), CpuUse::Starved);
        // An idle runtime whose heartbeat's worker waited to be scheduled.
        assert_eq!(cpu(30, Some(1800), 2000).classify(), CpuUse::Starved);
        // A short wait is not what held the heartbeat up.
        assert_eq!(cpu(30, Some(200), 2000).classify(), CpuUse::Asleep);
        // Asleep: parked, stopped, or the timer not driven.
        assert_eq!(cpu(5, Some(1), 2000).classify(), CpuUse::Asleep);
        // Without the wait only "busy" can be told.
        assert_eq!(cpu(3900, None, 2000).classify(), CpuUse::Busy);
        assert_eq!(cpu(30, None, 2000).classify(), CpuUse::Unknown);
    }

    #[test]
    fn description_names_what_is_known() {
        assert_eq!(
            cpu(3900, Some(40), 2000).describe(Some(2)),
            "on a CPU 3900 ms and waiting for one 40 ms of 2000 ms (2 workers)"
        );
        assert_eq!(
            cpu(30, None, 2000).describe(None),
            "on a CPU 30 ms (run-queue wait unknown) of 2000 ms"
        );
    }
}
