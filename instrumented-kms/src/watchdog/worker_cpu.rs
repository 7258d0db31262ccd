//! How much CPU a runtime's worker threads got, and how long they waited for
//! one, from the kernel's per-thread scheduler statistics
//! (`/proc/self/task/<tid>/schedstat`: time on a CPU, time runnable in a run
//! queue).
//!
//! A heartbeat that lags while no poll is stuck has two causes that look the
//! same from inside the runtime: tasks that keep every worker busy (the
//! runtime's own stall) and a host or hypervisor that does not give the
//! workers a CPU (not the runtime's fault). These two numbers tell them
//! apart. Without schedstat (a kernel built without `CONFIG_SCHED_INFO`) the
//! CPU time still comes from `stat`, and the wait is left out.

use std::time::{Duration, Instant};

use super::os_thread::stat_fields;
use crate::runtime::threads;

/// CPU accounting of a set of threads, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CpuTimes {
    /// Time on a CPU.
    pub(crate) on_cpu: Duration,
    /// Time runnable but waiting for a CPU; `None` without schedstat.
    pub(crate) waiting: Option<Duration>,
}

/// One thread's counters at one reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ThreadReading {
    tid: i64,
    on_cpu: Duration,
    waiting: Option<Duration>,
}

/// The counters of a runtime's worker threads at one instant.
#[derive(Debug, Clone)]
pub(crate) struct WorkerCpu {
    at: Instant,
    threads: Vec<ThreadReading>,
}

impl WorkerCpu {
    /// Reads the worker threads of the runtime behind `handle`. `None` when
    /// no worker thread is known (a runtime not built by
    /// [`runtime_builder`](crate::runtime_builder), whose threads never
    /// registered) or none could be read.
    pub(crate) fn take(handle: &tokio::runtime::Handle) -> Option<Self> {
        let metrics = handle.metrics();
        let threads: Vec<ThreadReading> = (0..metrics.num_workers())
            .filter_map(|w| metrics.worker_thread_id(w))
            .filter_map(threads::lookup)
            .filter_map(|info| read_thread(info.tid))
            .collect();
        (!threads.is_empty()).then(|| Self {
            at: Instant::now(),
            threads,
        })
    }

    /// When it was taken.
    pub(crate) fn at(&self) -> Instant {
        self.at
    }

    /// What the threads read in both snapshots accumulated between them,
    /// and the wall time between. Threads present in only one are left out.
    pub(crate) fn since(&self, before: &WorkerCpu) -> (CpuTimes, Duration) {
        let mut sum = CpuTimes {
            on_cpu: Duration::ZERO,
            waiting: Some(Duration::ZERO),
        };
        for now in &self.threads {
            let Some(then) = before.threads.iter().find(|t| t.tid == now.tid) else {
                continue;
            };
            sum.on_cpu += now.on_cpu.saturating_sub(then.on_cpu);
            sum.waiting = match (sum.waiting, now.waiting, then.waiting) {
                (Some(acc), Some(a), Some(b)) => Some(acc + a.saturating_sub(b)),
                _ => None,
            };
        }
        (sum, self.at.saturating_duration_since(before.at))
    }
}

/// Reads one thread of this process: schedstat, else `stat`'s CPU ticks.
fn read_thread(tid: i64) -> Option<ThreadReading> {
    let dir = format!("/proc/self/task/{tid}");
    if let Some((on_cpu, waiting)) = std::fs::read_to_string(format!("{dir}/schedstat"))
        .ok()
        .and_then(|s| parse_schedstat(&s))
    {
        return Some(ThreadReading {
            tid,
            on_cpu,
            waiting: Some(waiting),
        });
    }
    let on_cpu = std::fs::read_to_string(format!("{dir}/stat"))
        .ok()
        .and_then(|s| parse_stat_cpu(&s, clock_ticks_per_second()?))?;
    Some(ThreadReading {
        tid,
        on_cpu,
        waiting: None,
    })
}

/// `schedstat` is `<ns on cpu> <ns waiting on a run queue> <timeslices>`.
pub(crate) fn parse_schedstat(text: &str) -> Option<(Duration, Duration)> {
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    let on_cpu = fields.next()?.ok()?;
    let waiting = fields.next()?.ok()?;
    Some((Duration::from_nanos(on_cpu), Duration::from_nanos(waiting)))
}

/// `utime + stime` of a `stat` line (fields 14 and 15, counted from the
/// pid; [`stat_fields`] starts at the state, field 3).
pub(crate) fn parse_stat_cpu(stat: &str, ticks_per_second: u64) -> Option<Duration> {
    let mut fields = stat_fields(stat)?.skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let ticks = utime.checked_add(stime)?;
    (ticks_per_second > 0).then(|| {
        Duration::from_secs(ticks / ticks_per_second)
            + Duration::from_nanos((ticks % ticks_per_second) * 1_000_000_000 / ticks_per_second)
    })
}

fn clock_ticks_per_second() -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|t| *t > 0)
}

/// The accounting attributes of `kms.stall` (heartbeat) and `kms.runtime`
/// (`docs/wire-format.md`): CPU time and run-queue wait of the workers over a
/// window, and the window's length.
pub(crate) fn attributes(cpu: CpuTimes, window: Duration) -> Vec<(&'static str, i64)> {
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let mut out = vec![
        ("runtime.workers_cpu_ms", ms(cpu.on_cpu)),
        ("runtime.workers_cpu_window_ms", ms(window)),
    ];
    if let Some(waiting) = cpu.waiting {
        out.push(("runtime.workers_cpu_wait_ms", ms(waiting)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_lines() {
        assert_eq!(
            parse_schedstat("1500000000 250000000 42\n"),
            Some((Duration::from_millis(1500), Duration::from_millis(250)))
        );
        assert_eq!(parse_schedstat("12"), None);
        assert_eq!(parse_schedstat("x y z"), None);
    }

    #[test]
    fn stat_cpu_ticks_survive_odd_thread_names() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime ...
        let stat = "4242 (kms (worker) 0) R 1 4242 4242 0 -1 4194368 10 0 0 0 150 50 0 0 20 0";
        assert_eq!(parse_stat_cpu(stat, 100), Some(Duration::from_secs(2)));
        assert_eq!(parse_stat_cpu(stat, 0), None);
        assert_eq!(parse_stat_cpu("1 (x) R 1", 100), None);
    }

    #[test]
    fn a_spinning_worker_accumulates_cpu_time() {
        let rt = crate::runtime_builder(Some(1)).build().unwrap();
        let handle = rt.handle().clone();
        // Wait for the worker to start and register.
        let deadline = Instant::now() + Duration::from_secs(10);
        let before = loop {
            if let Some(s) = WorkerCpu::take(&handle) {
                break s;
            }
            assert!(Instant::now() < deadline, "worker thread never registered");
            std::thread::yield_now();
        };
        let spin = Duration::from_millis(300);
        rt.block_on(async {
            tokio::spawn(async move {
                let until = Instant::now() + spin;
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            })
            .await
            .unwrap();
        });
        let after = WorkerCpu::take(&handle).unwrap();
        let (cpu, window) = after.since(&before);
        assert!(window >= spin, "window {window:?}");
        // On a CPU or waiting for one for the whole spin (a loaded machine
        // may deschedule the worker, but the wait then counts). Without
        // schedstat only the CPU time is known.
        match cpu.waiting {
            Some(waiting) => assert!(
                cpu.on_cpu + waiting >= spin.mul_f64(0.8),
                "cpu {cpu:?} over a {spin:?} spin"
            ),
            None => assert!(cpu.on_cpu > Duration::ZERO, "cpu {cpu:?}"),
        }
        let attrs = attributes(cpu, window);
        assert_eq!(attrs[0].0, "runtime.workers_cpu_ms");
    }
}
