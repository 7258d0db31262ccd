//! D: the async runtime cannot make progress on the request: deadlocked or
//! stalled. Confirmed by a stall (a poll running past the threshold, the
//! heartbeat lagging), a lock cycle (parking_lot or async), or one of the
//! runtime's own resources exhausted: the blocking pool, the scheduler's
//! queues or its workers (busy, every turn late), tasks that can never be
//! woken, connections never accepted.
//! Ruled out only when the heartbeat shows the runtime healthy through the
//! failure AND every hung request is positively waiting on something else.

use super::{cite_requests, wait_summary, Effect, Finding, Model, Rule};
use crate::analyse::{fmt_time, CpuUse, Evidence, StallEpisode, StuckSpan, WaitsOn};

fn who(ep: &StallEpisode) -> String {
    match (&ep.thread_name, ep.worker) {
        (Some(n), _) => n.clone(),
        (None, Some(w)) => format!("worker {w}"),
        (None, None) => "runtime".into(),
    }
}

fn describe_stall(ep: &StallEpisode, threshold_ms: i64) -> String {
    let still = if ep.ended { "" } else { ", still stuck" };
    if ep.kind == "heartbeat" {
        return format!(
            "heartbeat lagged {} ms (threshold {} ms){}",
            ep.duration_ms,
            ep.threshold_ms.unwrap_or(threshold_ms),
            if ep.ended { "" } else { ", still lagging" }
        );
    }
    format!(
        "{} stuck in one poll for {} ms{}{}{}{still}",
        who(ep),
        ep.duration_ms,
        ep.task_id
            .map(|t| format!(", task {t}"))
            .unwrap_or_default(),
        ep.span_name
            .as_deref()
            .map(|s| format!(", in span `{s}`"))
            .unwrap_or_default(),
        ep.wchan
            .as_deref()
            .map(|w| format!(", thread waits in {w}"))
            .unwrap_or_default(),
    )
}

/// A stall counts when still going on, or (during a failure) when it lasted
/// the long-stall time, unless it is a heartbeat stall something else
/// explains: the host (the workers waited for a CPU longer than they ran) or
/// a task dump that began with it.
fn counts(m: &Model<'_>, ep: &StallEpisode) -> bool {
    !ep.not_the_runtimes() && (!ep.ended || (m.failing() && ep.duration_ms >= long_stall_ms(m)))
}

/// The long-stall time in milliseconds.
fn long_stall_ms(m: &Model<'_>) -> i64 {
    i64::try_from(m.config.long_stall.as_millis()).unwrap_or(i64::MAX)
}

/// A stall still going on, or one that lasted the long-stall time.
fn held_long(m: &Model<'_>, ep: &StallEpisode) -> bool {
    !ep.ended || ep.duration_ms >= long_stall_ms(m)
}

/// Why a heartbeat-only stall with no worker stuck in a poll does not decide
/// D: what the workers' CPU accounting says, or that there was none.
fn heartbeat_stall_undecided(ep: &StallEpisode) -> String {
    let lag = format!(
        "the heartbeat lagged {} ms while no worker was stuck in a poll",
        ep.duration_ms
    );
    match (ep.cpu_use(), ep.workers_cpu) {
        (Some(CpuUse::Asleep), Some(cpu)) => format!(
            "{lag}, and the workers neither ran nor waited for a CPU (they were {}): the process was stopped (a debugger, SIGSTOP), the VM paused, or the runtime's timer went undriven; the facts do not say which",
            cpu.describe(ep.workers)
        ),
        (_, Some(cpu)) => format!(
            "{lag}, and the workers were not busy (they were {}); without their run-queue wait (the kernel's schedstat) a host that does not schedule them cannot be told from a stalled runtime",
            cpu.describe(ep.workers)
        ),
        (_, None) => format!(
            "{lag}; the producer sent no CPU accounting of its workers (an older library, or a runtime not built by runtime_builder), so tasks keeping every worker busy cannot be told from a host that does not schedule them"
        ),
    }
}

/// A poll or heartbeat stall (`kms.stall`) in the failure window that is
/// still going on or lasted long.
struct Stalled;

impl Rule for Stalled {
    fn name(&self) -> &'static str {
        "stalled"
    }
    fn reads(&self) -> &'static str {
        "kms.stall / kms.stall_end (stall.kind, tokio.worker, thread.name, span.name, os.thread.wchan)"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let st = &m.d.stall;
        let eps: Vec<&StallEpisode> = st
            .episodes_in(m.failure)
            .filter(|ep| counts(m, ep))
            .collect();
        let first = eps.first()?;
        let ev: Vec<Evidence> = eps
            .iter()
            .map(|ep| {
                let kind = if ep.kind == "heartbeat" {
                    "heartbeat_stall"
                } else {
                    "poll_stall"
                };
                Evidence::new(kind, describe_stall(ep, st.threshold_ms))
                    .span(ep.trace_id.as_deref(), ep.span_id.as_deref())
                    .at(ep.first_ns)
            })
            .collect();
        let culprit = match eps.iter().find(|ep| ep.kind != "heartbeat") {
            Some(ep) => {
                let request =
                    m.d.stuck
                        .iter()
                        .find(|s| {
                            ep.span_id
                                .as_ref()
                                .is_some_and(|id| s.member_ids.contains(id))
                        })
                        .map(|s| {
                            format!(
                                " ({} trace {})",
                                s.rpc_method.as_deref().unwrap_or(&s.name),
                                s.trace_id
                            )
                        })
                        .unwrap_or_default();
                format!(
                    "{} blocked in a poll{}{request}",
                    who(ep),
                    ep.span_name
                        .as_deref()
                        .map(|s| format!(" in `{s}`"))
                        .unwrap_or_default()
                )
            }
            // Only the heartbeat stalled: when the run queues show why
            // (workers busy, runnable tasks piling up), that rule names it.
            None if m.d.resources.queues.starving && m.hang => return None,
            None => {
                // A heartbeat stall with no poll stuck is the runtime's own
                // only when its workers were busy: an idle runtime on a host
                // that does not schedule it lags the same way.
                let busy = eps.iter().find(|ep| ep.cpu_use() == Some(CpuUse::Busy));
                let stuck = eps
                    .iter()
                    .find(|ep| ep.workers_stuck.is_some_and(|n| n > 0));
                match (busy, stuck) {
                    (Some(ep), _) => format!(
                        "runnable tasks kept the workers busy with no poll running past the threshold (they were {}): the heartbeat waits in the run queue behind them",
                        ep.workers_cpu.map(|c| c.describe(ep.workers)).unwrap_or_default()
                    ),
                    (None, Some(ep)) => format!(
                        "runtime heartbeat stalled with {} workers in a poll past the threshold",
                        ep.workers_stuck.unwrap_or(0)
                    ),
                    (None, None) => {
                        let mut ev = ev;
                        ev.push(
                            Evidence::new("missing_data", heartbeat_stall_undecided(first))
                                .at(first.first_ns),
                        );
                        return Some(Finding::new(Effect::Missing, ev));
                    }
                }
            }
        };
        Some(Finding::confirms(culprit, Some(first.first_ns), ev))
    }
}

/// Heartbeat stalls and lagging samples during which the workers waited for
/// a CPU longer than they ran: the host (hypervisor, cgroup, neighbours) did
/// not schedule the runtime. Cited, and kept out of the runtime's stalls.
struct HostCpuStarved;

impl Rule for HostCpuStarved {
    fn name(&self) -> &'static str {
        "host_cpu_starved"
    }
    fn reads(&self) -> &'static str {
        "kms.stall (heartbeat), kms.runtime: runtime.workers_cpu_ms, runtime.workers_cpu_wait_ms, runtime.workers_cpu_window_ms, runtime.workers"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let mut ev: Vec<Evidence> = m
            .d
            .stall
            .episodes_in(m.failure)
            .filter(|ep| ep.host_starved())
            .filter_map(|ep| {
                let cpu = ep.workers_cpu?;
                Some(
                    Evidence::new(
                        "host_cpu_starved",
                        format!(
                            "heartbeat lagged {} ms while the workers were {}: the host did not schedule the runtime, which is not a runtime stall",
                            ep.duration_ms,
                            cpu.describe(ep.workers)
                        ),
                    )
                    .at(ep.first_ns),
                )
            })
            .collect();
        let lagging = m.d.stall.host_starved_samples_in_failure;
        let saturated = m.d.resources.queues.host_starved_samples;
        if lagging + saturated > 0 {
            ev.push(Evidence::new(
                "host_cpu_starved",
                format!(
                    "kms.runtime samples taken while the workers waited for a CPU longer than they ran: {lagging} with the heartbeat late (not counted as runtime lag), {saturated} with every worker busy (not counted as saturated)"
                ),
            ));
        }
        (!ev.is_empty()).then(|| Finding::new(Effect::Cites, ev))
    }
}

/// Heartbeat stalls that began as a task dump was requested, on a runtime
/// that had not been stalling before: tokio's dump of a busy runtime can
/// stall it by itself, so they are cited and kept out of the runtime's
/// stalls.
struct StalledByTaskdump;

impl Rule for StalledByTaskdump {
    fn name(&self) -> &'static str {
        "stalled_by_taskdump"
    }
    fn reads(&self) -> &'static str {
        "kms.stall (heartbeat), kms.taskdump (taskdump.outcome, taskdump.duration_ms), kms.runtime heartbeat.lag_ms"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let st = &m.d.stall;
        let eps: Vec<&StallEpisode> = st
            .episodes_in(m.failure)
            .filter(|ep| ep.during_taskdump && !ep.host_starved())
            .collect();
        let mut ev: Vec<Evidence> = eps
            .iter()
            .map(|ep| {
                Evidence::new(
                    "stalled_by_taskdump",
                    format!(
                        "{}: it began as a task dump was requested, on a runtime that had not been stalling before, and a tokio task dump of a busy runtime can stall it by itself (KMS_DIAG_TASKDUMP); not counted as the runtime's stall",
                        describe_stall(ep, st.threshold_ms)
                    ),
                )
                .at(ep.first_ns)
            })
            .collect();
        if st.taskdump_samples_in_failure > 0 {
            ev.push(Evidence::new(
                "stalled_by_taskdump",
                format!(
                    "{} kms.runtime samples lagged during such a stall (not counted as runtime lag)",
                    st.taskdump_samples_in_failure
                ),
            ));
        }
        if ev.is_empty() {
            return None;
        }
        // Going on or long: the runtime really was held, by the dump, so
        // what the application would have done is unknown.
        if eps.iter().any(|ep| held_long(m, ep)) {
            ev.insert(
                0,
                Evidence::new(
                    "missing_data",
                    "the runtime stalled, but the stall began with a task dump, so whether the application stalls it too is unknown: collect again with KMS_DIAG_TASKDUMP off",
                ),
            );
            return Some(Finding::new(Effect::Missing, ev));
        }
        Some(Finding::new(Effect::Cites, ev))
    }
}

/// `kms.runtime` samples late persistently through the failure window.
struct HeartbeatLagging;

impl Rule for HeartbeatLagging {
    fn name(&self) -> &'static str {
        "heartbeat_lagging"
    }
    fn reads(&self) -> &'static str {
        "kms.runtime heartbeat.lag_ms, heartbeat.ok"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let st = &m.d.stall;
        if !(st.lag_persistent && m.hang) {
            return None;
        }
        let mut e = Evidence::new(
            "heartbeat_lag",
            format!(
                "{} of {} kms.runtime samples in the failure window show the heartbeat late (max lag {} ms, threshold {} ms) or missed",
                st.lagging_samples_in_failure,
                st.samples_in_failure,
                st.max_lag_in_failure_ms.unwrap_or(0),
                st.threshold_ms
            ),
        );
        if let Some(t) = st.first_lagging_ns {
            e = e.at(t);
        }
        Some(Finding::confirms(
            "runtime heartbeat lagging".into(),
            st.first_lagging_ns,
            vec![e],
        ))
    }
}

/// A parking_lot deadlock cycle (`kms.deadlock`).
struct ParkingLotCycle;

impl Rule for ParkingLotCycle {
    fn name(&self) -> &'static str {
        "parking_lot_cycle"
    }
    fn reads(&self) -> &'static str {
        "kms.deadlock (deadlock.threads)"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let cycles = &m.d.deadlock.cycles;
        let mut culprit = None;
        let ev = cycles
            .iter()
            .map(|cy| {
                let threads = cy
                    .threads
                    .iter()
                    .map(|t| {
                        format!(
                            "{} (tid {}){}",
                            t.thread_name.as_deref().unwrap_or("?"),
                            t.thread_id,
                            t.waiting_at
                                .as_deref()
                                .map(|w| format!(" at {w}"))
                                .unwrap_or_default()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                culprit.get_or_insert_with(|| format!("parking_lot deadlock: {threads}"));
                Evidence::new(
                    "deadlock",
                    format!(
                        "parking_lot deadlock cycle of {} threads: {threads}; reported {} times",
                        cy.threads.len(),
                        cy.reports
                    ),
                )
                .at(cy.first_ns)
            })
            .collect();
        let since = cycles.iter().map(|c| c.first_ns).min();
        Some(Finding::confirms(culprit?, since, ev))
    }
}

/// tokio-console shows tasks waiting on each other's async locks.
struct AsyncLockCycle;

impl Rule for AsyncLockCycle {
    fn name(&self) -> &'static str {
        "async_lock_cycle"
    }
    fn reads(&self) -> &'static str {
        "tokio-console async ops, resources (locked, permits) and tasks; idle kms.request spans"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let lw = &m.d.lock_wait;
        if !lw.cycle_suspected {
            return None;
        }
        let at = lw.snapshot_ns.unwrap_or(0);
        let mut ev: Vec<Evidence> = lw
            .waits
            .iter()
            .map(|w| {
                Evidence::new(
                    "lock_wait",
                    format!(
                        "task {}{}{} waits {} ms on {} {}{}{} (waker count {})",
                        w.task_id,
                        w.task_name
                            .as_deref()
                            .map(|n| format!(" `{n}`"))
                            .unwrap_or_default(),
                        w.spawn_location
                            .as_deref()
                            .map(|l| format!(" spawned at {l}"))
                            .unwrap_or_default(),
                        w.waited_ms,
                        w.resource_type,
                        w.resource_id,
                        w.resource_location
                            .as_deref()
                            .map(|l| format!(" created at {l}"))
                            .unwrap_or_default(),
                        if w.held == Some(true) { ", held" } else { "" },
                        w.waker_count
                            .map(|c| c.to_string())
                            .unwrap_or_else(|| "?".into())
                    ),
                )
                .at(at)
            })
            .collect();
        // The held locks name the cycle when the recorded waits do not.
        let wait_locks: std::collections::BTreeSet<i64> =
            lw.waits.iter().map(|w| w.resource_id).collect();
        let use_held = lw.held_locks.len() >= 2 && wait_locks.len() < 2;
        let named = |t: &str, id: i64, loc: Option<&str>| {
            format!(
                "{t} {id}{}",
                loc.map(|l| format!(" ({l})")).unwrap_or_default()
            )
        };
        let locks: std::collections::BTreeSet<String> = if use_held {
            for l in &lw.held_locks {
                ev.push(
                    Evidence::new(
                        "lock_held",
                        format!(
                            "{} {}{} held since at least {} and still held",
                            l.resource_type,
                            l.resource_id,
                            l.location
                                .as_deref()
                                .map(|x| format!(" created at {x}"))
                                .unwrap_or_default(),
                            fmt_time(l.held_since_ns)
                        ),
                    )
                    .at(l.held_since_ns),
                );
            }
            lw.held_locks
                .iter()
                .map(|l| named(&l.resource_type, l.resource_id, l.location.as_deref()))
                .collect()
        } else {
            lw.waits
                .iter()
                .map(|w| {
                    named(
                        &w.resource_type,
                        w.resource_id,
                        w.resource_location.as_deref(),
                    )
                })
                .collect()
        };
        ev.push(Evidence::new(
            "lock_cycle",
            lw.cycle_reason.clone().unwrap_or_default(),
        ));
        let idle: Vec<&StuckSpan> =
            m.d.stuck
                .iter()
                .filter(|s| s.waits_on == WaitsOn::Handler)
                .collect();
        ev.extend(cite_requests(idle, "stuck_handler"));
        let culprit = format!(
            "async lock cycle: {}",
            locks.into_iter().collect::<Vec<_>>().join(" <-> ")
        );
        let since = lw
            .held_locks
            .iter()
            .map(|l| l.held_since_ns)
            .min()
            .or(lw.snapshot_ns);
        Some(Finding::confirms(culprit, since, ev))
    }
}

/// The blocking pool at its maximum with jobs queued that do not drain.
struct BlockingPoolExhausted;

impl Rule for BlockingPoolExhausted {
    fn name(&self) -> &'static str {
        "blocking_pool_exhausted"
    }
    fn reads(&self) -> &'static str {
        "kms.runtime runtime.blocking_threads, runtime.blocking_threads_max, runtime.idle_blocking_threads, runtime.blocking_queue_depth"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let p = &m.d.resources.blocking_pool;
        let run = p.queued.as_ref().filter(|_| p.exhausted && m.hang)?;
        let threads = match (p.peak_threads, p.max_threads) {
            (Some(t), Some(max)) => format!("{t} threads of a maximum of {max}"),
            (Some(t), None) => format!("{t} threads, all busy"),
            _ => "every thread busy".to_owned(),
        };
        let summary = format!(
            "the blocking pool ran {threads} with jobs queued in {} samples in a row, {} queued at first and {} at the last sample: tokio queues a spawn_blocking job only when every pool thread is busy at the maximum, and the queue did not drain",
            run.samples, run.first, run.last
        );
        let culprit = format!(
            "blocking pool exhausted: {threads}, {} jobs queued and not draining",
            run.last
        );
        let mut ev = vec![Evidence::new("blocking_pool_exhausted", summary).at(run.from_ns)];
        ev.extend(cite_requests(m.hung(), "waiting_request"));
        Some(Finding::confirms(culprit, Some(run.from_ns), ev))
    }
}

/// Queues grow while every worker stays busy: tasks are runnable but the
/// workers never get to them.
struct SchedulerStarvation;

impl Rule for SchedulerStarvation {
    fn name(&self) -> &'static str {
        "scheduler_starvation"
    }
    fn reads(&self) -> &'static str {
        "kms.runtime runtime.global_queue_depth, runtime.local_queue_depth, runtime.busy_workers (or runtime.busy_ratio), runtime.workers"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let q = &m.d.resources.queues;
        let run = q.saturated.as_ref().filter(|_| q.starving && m.hang)?;
        let workers = q
            .workers
            .map(|w| format!("all {w} workers"))
            .unwrap_or_else(|| "every worker".into());
        let summary = format!(
            "{workers} stayed busy for {} samples in a row while the run queues grew from {} to {} tasks (peak {}): runnable tasks wait for a worker",
            run.samples, run.first, run.last, run.peak
        );
        let culprit = format!(
            "worker queues starved: {} runnable tasks queued behind busy workers",
            run.last
        );
        Some(Finding::confirms(
            culprit,
            Some(run.from_ns),
            vec![Evidence::new("scheduler_starvation", summary).at(run.from_ns)],
        ))
    }
}

/// The heartbeat late in most samples of the failure while the workers were
/// busy on a CPU: runnable tasks keep the workers busy and every woken task
/// waits about that long for each of its turns. Each lag may be under the
/// stall threshold (no stall, no poll stuck), yet a request needs many
/// turns (accept, TLS, reads, the handler, its calls), so it hangs.
struct BusyAndLate;

impl Rule for BusyAndLate {
    fn name(&self) -> &'static str {
        "busy_and_late"
    }
    fn reads(&self) -> &'static str {
        "kms.runtime heartbeat.lag_ms, heartbeat.ok, runtime.workers_cpu_* (or runtime.busy_workers, runtime.busy_ratio)"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let st = &m.d.stall;
        let q = &m.d.resources.queues;
        // The growing run queues name it when they show the backlog.
        if !st.saturated || !m.hang || q.starving {
            return None;
        }
        let median = st.busy_late_median_lag_ms.unwrap_or(0);
        let summary = format!(
            "{} of {} kms.runtime samples in the failure window show the heartbeat at least {} ms late (median {median} ms, max {} ms; stall threshold {} ms) while the workers were busy on a CPU: no poll ran past the threshold, yet every woken task waited about that long for a turn",
            st.busy_late_samples_in_failure,
            st.samples_in_failure,
            st.busy_late_bar_ms,
            st.max_lag_in_failure_ms.unwrap_or(0),
            st.threshold_ms
        );
        let culprit = format!(
            "runnable tasks kept the workers busy: each woken task waited about {median} ms in the run queue for a turn (the heartbeat's median lag), and a request needs many turns"
        );
        let mut first = Evidence::new("busy_and_late", summary);
        if let Some(t) = st.first_busy_late_ns {
            first = first.at(t);
        }
        let mut ev = vec![first];
        ev.extend(cite_requests(m.hung(), "waiting_request"));
        Some(Finding::confirms(culprit, st.first_busy_late_ns, ev))
    }
}

/// Tasks spawned during the failure sit idle with no waker left: nothing
/// can ever wake them (tokio-console's lost-waker lint).
struct NeverWoken;

impl Rule for NeverWoken {
    fn name(&self) -> &'static str {
        "never_woken"
    }
    fn reads(&self) -> &'static str {
        "tokio-console tasks (state, waker_count, last poll, busy/idle/scheduled time, spawn location)"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let r = &m.d.resources;
        let first = r.unwakeable.first().filter(|_| m.hang)?;
        let at = r.console_snapshot_ns.unwrap_or(0);
        let ev = r
            .unwakeable
            .iter()
            .take(super::MAX_CITED)
            .map(|t| {
                Evidence::new(
                    "lost_waker",
                    format!(
                        "task {}{}{} idle for {} ms with no waker left: it can never be woken",
                        t.task_id,
                        t.name
                            .as_deref()
                            .map(|n| format!(" `{n}`"))
                            .unwrap_or_default(),
                        t.spawn_location
                            .as_deref()
                            .map(|l| format!(" spawned at {l}"))
                            .unwrap_or_default(),
                        t.idle_ms
                    ),
                )
                .at(at)
            })
            .collect();
        let culprit = format!(
            "{} task(s) never woken (lost waker){}",
            r.unwakeable.len(),
            first
                .spawn_location
                .as_deref()
                .map(|l| format!(", spawned at {l}"))
                .unwrap_or_default()
        );
        Some(Finding::confirms(
            culprit,
            Some(at - first.idle_ms * 1_000_000),
            ev,
        ))
    }
}

/// Connections wait in the listen queue, unaccepted, while fds are not
/// exhausted and the heartbeat does not show the runtime healthy: the accept
/// loop is not being polled.
struct NotAccepting;

impl Rule for NotAccepting {
    fn name(&self) -> &'static str {
        "not_accepting"
    }
    fn reads(&self) -> &'static str {
        "kms.process tcp.listen_queue, tcp.listen_backlog, tcp.unaccepted; kms.runtime heartbeat; process.open_fds"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let l = &m.d.resources.listen;
        let run = l.waiting.as_ref().filter(|_| l.not_accepting && m.hang)?;
        if m.d.connections.exhausted() || runtime_healthy(m) {
            return None;
        }
        let summary = listen_summary(m);
        Some(Finding::confirms(
            format!("listen queue: {} connections never accepted", run.last),
            Some(run.from_ns),
            vec![Evidence::new("unaccepted_connections", summary).at(run.from_ns)],
        ))
    }
}

/// One sentence on the listen queue.
pub(crate) fn listen_summary(m: &Model<'_>) -> String {
    let l = &m.d.resources.listen;
    let Some(run) = &l.waiting else {
        return "no connection waited in the listen queue".into();
    };
    format!(
        "connections waited unaccepted in the listen queue{} for {} samples in a row: {} at first, {} at the last (peak {}){}",
        l.backlog.map(|b| format!(" (backlog {b})")).unwrap_or_default(),
        run.samples,
        run.first,
        run.last,
        run.peak,
        if l.unaccepted_close_wait_peak > 0 {
            format!(
                "; {} of them already given up by their client (CLOSE_WAIT, never accepted)",
                l.unaccepted_close_wait_peak
            )
        } else {
            String::new()
        }
    )
}

/// True when closed outbound calls to some peer were slow during the failure.
fn slow_calls(m: &Model<'_>) -> bool {
    m.closed_calls.values().any(|c| !c.slow.is_empty())
}

/// True when `kms.runtime` samples cover the failure window with no
/// persistent lag, no saturation (busy and late) and no stall that counts.
pub(crate) fn runtime_healthy(m: &Model<'_>) -> bool {
    let st = &m.d.stall;
    st.covers_failure
        && !st.lag_persistent
        && !st.saturated
        && !st.episodes_in(m.failure).any(|ep| counts(m, ep))
}

/// True when the runtime not only stayed healthy by D's measure but ran:
/// no heartbeat stall that something else explains (a starved host, a task
/// dump) was going on or lasted long in the failure window. Such a stall is
/// not the application's fault, yet nothing was accepted or polled while
/// it lasted.
pub(crate) fn runtime_ran(m: &Model<'_>) -> bool {
    let st = &m.d.stall;
    runtime_healthy(m)
        && st.taskdump_samples_in_failure == 0
        && st.host_starved_samples_in_failure == 0
        && !st
            .episodes_in(m.failure)
            .any(|ep| ep.not_the_runtimes() && held_long(m, ep))
}

/// Short stalls and lag spikes that ended, and task dumps that timed out:
/// cited, never decisive.
struct Transients;

impl Rule for Transients {
    fn name(&self) -> &'static str {
        "transients"
    }
    fn reads(&self) -> &'static str {
        "kms.stall / kms.stall_end, kms.runtime heartbeat.lag_ms, kms.taskdump (taskdump.outcome, taskdump.local_queue_depth)"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let st = &m.d.stall;
        let long_ms = long_stall_ms(m);
        let mut ev: Vec<Evidence> = st
            .episodes_in(m.failure)
            .filter(|ep| !counts(m, ep) && !ep.not_the_runtimes())
            .map(|ep| {
                Evidence::new(
                    "transient_stall",
                    format!(
                        "{}; ended, shorter than {long_ms} ms: explains no hang",
                        describe_stall(ep, st.threshold_ms)
                    ),
                )
                .span(ep.trace_id.as_deref(), ep.span_id.as_deref())
                .at(ep.first_ns)
            })
            .collect();
        if st.lagging_samples_in_failure > 0 && !(st.lag_persistent && m.hang) {
            ev.push(Evidence::new(
                "transient_lag",
                format!(
                    "{} of {} kms.runtime samples in the window show the heartbeat late (max lag {} ms, threshold {} ms): spikes, not a stall",
                    st.lagging_samples_in_failure,
                    st.samples_in_failure,
                    st.max_lag_in_failure_ms.unwrap_or(0),
                    st.threshold_ms
                ),
            ));
        }
        let r = &m.d.requests;
        if r.taskdump_timeouts > 0 {
            let mut e = Evidence::new(
                "taskdump_timeout",
                format!(
                    "{} task dumps timed out: the runtime did not answer the dump request (its workers were busy or blocked)",
                    r.taskdump_timeouts
                ),
            );
            if let Some(t) = r.first_taskdump_timeout_ns {
                e = e.at(t);
            }
            ev.push(e);
        }
        if let Some(skips) = &r.taskdump_skips {
            ev.push(
                Evidence::new(
                    "taskdump_skipped",
                    format!(
                        "the library skipped task dumps ({} stretch(es) of intervals){}: a tokio dump of a runtime with that many runnable tasks (or a late heartbeat) can freeze it for good, so the stuck requests have no await chain from then",
                        skips.count,
                        skips
                            .max_local_queue_depth
                            .map(|q| format!(", up to {q} tasks queued in the workers' local run queues"))
                            .unwrap_or_default()
                    ),
                )
                .at(skips.first_ns),
            );
        }
        (!ev.is_empty()).then(|| Finding::new(Effect::Cites, ev))
    }
}

/// What the probe's failure class says about the runtime, for its scheme.
struct ProbeClass;

impl Rule for ProbeClass {
    fn name(&self) -> &'static str {
        "probe_class"
    }
    fn reads(&self) -> &'static str {
        "probe_attempts (outcome) of the judged episode, the probed URL's scheme"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let p = &m.d.probe;
        let class = p.failure_class.as_deref()?;
        let at = p.first_failure_ns?;
        let tls = p.scheme.as_deref() != Some("http");
        let summary = match (class, tls) {
            ("tls", _) => "probe: TLS handshakes fail or time out; the TLS handshake runs in a task the runtime polls, so a runtime that cannot poll connection tasks (stall) or cannot accept (fd exhaustion) fits, a stuck handler does not",
            ("timeout", true) => "probe: TLS handshakes complete but GetMeta gets no answer; the runtime still polls accept and connection tasks, so a full runtime stall does not fit",
            ("timeout", false) => "probe (plain HTTP): TCP connects but GetMeta gets no answer; the kernel completes TCP handshakes from the listen backlog without the runtime, so this says nothing about whether the runtime accepts or polls",
            ("connect", _) => "probe: TCP connects fail; the process is gone, not listening, or its listen backlog is full",
            ("http_status", _) => "probe: GetMeta answers with an error status; the KMS is not hung",
            _ => "probe: GetMeta fails",
        };
        Some(Finding::one(
            Effect::Cites,
            Evidence::new(&format!("probe_{class}"), summary).at(at),
        ))
    }
}

/// No `kms.runtime` samples cover the failure window.
struct NoRuntimeSamples;

impl Rule for NoRuntimeSamples {
    fn name(&self) -> &'static str {
        "no_runtime_samples"
    }
    fn reads(&self) -> &'static str {
        "kms.runtime (heartbeat) samples and their spacing"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let st = &m.d.stall;
        if st.covers_failure {
            return None;
        }
        let why = if st.runtime_samples == 0 {
            "no kms.runtime samples (heartbeat) and no kms.stall or kms.deadlock events in the window: cannot tell a stalled runtime from a healthy one (is the library built with runtime-metrics and watchdog?)".to_owned()
        } else {
            format!(
                "kms.runtime samples do not cover the failure window: {} samples in it, largest gap {} ms (interval {} ms)",
                st.samples_in_failure,
                st.largest_gap_in_failure_ms.unwrap_or(0),
                st.sample_interval_ms.unwrap_or(0)
            )
        };
        Some(Finding::one(
            Effect::Missing,
            Evidence::new("missing_data", why),
        ))
    }
}

/// Hung requests idle in the handler, in no outbound call and behind none:
/// a never-woken future, an app-level wait (a leaked permit, a channel no
/// one sends on) or a lock cycle the console did not see all look alike.
struct IdleInHandler;

impl Rule for IdleInHandler {
    fn name(&self) -> &'static str {
        "idle_in_handler"
    }
    fn reads(&self) -> &'static str {
        "innermost spans of open and cancelled kms.request spans; kms.taskdump await chains; tokio-console lock waits"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let idle: Vec<&StuckSpan> = m.hung().filter(|s| unaccounted(m, s)).collect();
        let first = idle.first()?;
        let lw = &m.d.lock_wait;
        let in_io = m.hung().filter(|s| s.waits_on.is_outbound()).count();
        let console = if lw.console_snapshots == 0 {
            "no tokio-console recording (serve --console) to show lost wakers or lock waits"
                .to_owned()
        } else if lw.waits.is_empty() {
            format!(
                "tokio-console ({} live tasks) shows no task waiting on a lock and no lost waker{}",
                lw.live_tasks,
                lw.console_gaps
                    .describe()
                    .map(|gap| format!(", but its view is partial: it {gap}"))
                    .unwrap_or_default()
            )
        } else if !lw.cycle_suspected && in_io > 0 {
            format!(
                "tokio-console shows {} task(s) waiting on a held lock while {in_io} hung requests sit in outbound calls: they are likely queued on a lock held across such a call, which a span around the lock scope would prove",
                lw.waits.len()
            )
        } else {
            format!(
                "tokio-console lock waits are not a cycle: {}",
                lw.cycle_reason.clone().unwrap_or_default()
            )
        };
        let chain = if first.await_chain.is_empty() {
            "no await chain (the task dump, feature `taskdump`, would name the awaited future)"
                .to_owned()
        } else {
            format!(
                "await chain of trace {}: {}",
                first.trace_id,
                first.await_chain.join(" > ")
            )
        };
        let mut ev = vec![Evidence::new(
            "missing_data",
            format!(
                "{} hung requests wait inside the handler with no outbound call open and none queued behind one ({}); the heartbeat shows the runtime polling, but a never-woken future, a wait no one will end (a leaked permit, a channel with no sender) and an unseen lock cycle look alike here; {console}; {chain}",
                idle.len(),
                wait_summary(idle.iter().copied())
            ),
        )
        .span(Some(&first.trace_id), Some(&first.innermost.span_id))];
        ev.extend(cite_requests(idle, "stuck_handler"));
        Some(Finding::new(Effect::Missing, ev))
    }
}

/// True when nothing outside the runtime accounts for this hung request:
/// idle in the handler and queued behind no call.
fn unaccounted(m: &Model<'_>, s: &StuckSpan) -> bool {
    s.waits_on == WaitsOn::Handler
        && s.queued_behind.is_none()
        && !m.d.memory.near_limit
        && !m.d.connections.exhausted()
}

/// GetMeta hangs, requests reach the handler, yet no hung request span was
/// stored: the facts that would show where they wait are missing.
struct NoRequestSeen;

impl Rule for NoRequestSeen {
    fn name(&self) -> &'static str {
        "no_request_seen"
    }
    fn reads(&self) -> &'static str {
        "open and cancelled kms.request spans; kms.request spans started in the failure window; process fds"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        if !m.hang || m.hung().next().is_some() || m.d.connections.exhausted() || slow_calls(m) {
            return None;
        }
        let why = if m.d.resources.listen.not_accepting {
            "GetMeta hangs and connections wait unaccepted in the listen queue while fds stay below the limit and no request hangs in the handler: a connection limit in the accept loop and an accept task that is never woken look alike here (tokio-console's lost-waker lint or the task dump would tell)"
        } else if m.d.connections.requests_started_in_failure == Some(0) {
            "GetMeta hangs and no request reached the handler while fds stay below the limit: the requests stop before the handler (accept, TLS, routing) and nothing shows where"
        } else {
            "GetMeta hangs, but no request span is open or was cancelled: the spans that would show where requests wait are missing"
        };
        Some(Finding::one(
            Effect::Missing,
            Evidence::new("missing_data", why),
        ))
    }
}

/// The heartbeat shows the runtime healthy through the failure, no runtime
/// resource is exhausted, and every hung request waits on something outside
/// the runtime (an outbound call, directly or queued behind one), or memory
/// or fds ran out. Without a failure: the heartbeat stayed healthy.
struct HealthyAndWaitsElsewhere;

impl Rule for HealthyAndWaitsElsewhere {
    fn name(&self) -> &'static str {
        "healthy_and_waits_elsewhere"
    }
    fn reads(&self) -> &'static str {
        "kms.runtime heartbeat coverage and lag; blocking pool; listen queue (unless fds ran out: accept then fails); wait locations of hung requests"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let st = &m.d.stall;
        let r = &m.d.resources;
        // With fds exhausted, accept fails (EMFILE) and connections stay in
        // the listen queue however healthy the runtime is.
        let listen_stuck = r.listen.not_accepting && !m.d.connections.exhausted();
        if !runtime_healthy(m) || r.blocking_pool.exhausted || listen_stuck {
            return None;
        }
        let healthy = Evidence::new(
            "runtime_healthy",
            format!(
                "heartbeat healthy through the {}: max lag {} ms over {} kms.runtime samples (threshold {} ms); no lasting stall, no deadlock, blocking pool and listen queue not stuck",
                m.window_name(),
                st.max_lag_in_failure_ms.unwrap_or(0),
                st.samples_in_failure,
                st.threshold_ms
            ),
        )
        .at(m.failure.from_ns);
        if !m.hang {
            return Some(Finding::one(Effect::RulesOut, healthy));
        }
        let hung: Vec<&StuckSpan> = m.hung().collect();
        let elsewhere = if hung.is_empty() {
            if m.d.connections.exhausted() {
                "no request hung in the handler; fds ran out (E)".to_owned()
            } else if slow_calls(m) {
                "no request hung: the requests of the failure window completed late, waiting on slow outbound calls".to_owned()
            } else {
                return None;
            }
        } else if hung.iter().any(|s| unaccounted(m, s)) {
            return None;
        } else if hung
            .iter()
            .all(|s| s.waits_on.is_outbound() || s.queued_behind.is_some())
        {
            format!(
                "all {} hung requests wait on outbound calls, directly or queued behind one: {}",
                hung.len(),
                wait_summary(hung.iter().copied())
            )
        } else {
            format!(
                "the {} hung requests wait on I/O or on resources the process ran out of ({}): {}",
                hung.len(),
                if m.d.memory.near_limit {
                    "memory near its limit, C"
                } else {
                    "fds, E"
                },
                wait_summary(hung.iter().copied())
            )
        };
        Some(Finding::new(
            Effect::RulesOut,
            vec![healthy, Evidence::new("waits_elsewhere", elsewhere)],
        ))
    }
}

/// The listen queue, cited whenever it held connections.
struct ListenQueueCited;

impl Rule for ListenQueueCited {
    fn name(&self) -> &'static str {
        "listen_queue"
    }
    fn reads(&self) -> &'static str {
        "kms.process tcp.listen_queue, tcp.unaccepted"
    }
    fn check(&self, m: &Model<'_>) -> Option<Finding> {
        let l = &m.d.resources.listen;
        let run = l.waiting.as_ref()?;
        if NotAccepting.check(m).is_some() {
            return None;
        }
        Some(Finding::one(
            Effect::Cites,
            Evidence::new("unaccepted_connections", listen_summary(m)).at(run.from_ns),
        ))
    }
}

/// The rules of D, in order.
pub(crate) fn rules() -> Vec<Box<dyn Rule>> {
    vec![
        Box::new(ParkingLotCycle),
        Box::new(AsyncLockCycle),
        Box::new(Stalled),
        Box::new(HostCpuStarved),
        Box::new(StalledByTaskdump),
        Box::new(SchedulerStarvation),
        Box::new(BusyAndLate),
        Box::new(HeartbeatLagging),
        Box::new(BlockingPoolExhausted),
        Box::new(NeverWoken),
        Box::new(NotAccepting),
        Box::new(NoRuntimeSamples),
        Box::new(IdleInHandler),
        Box::new(NoRequestSeen),
        Box::new(HealthyAndWaitsElsewhere),
        Box::new(ListenQueueCited),
        Box::new(Transients),
        Box::new(ProbeClass),
    ]
}
