//! Stall tracking for one watched runtime: which polls and heartbeat lags
//! are over threshold, when to report them again, and when they end.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::heartbeat::Heartbeat;
use super::os_thread;
use super::worker_cpu::{self, WorkerCpu};
use super::WatchdogConfig;
use crate::event::{AttrValue, DiagEvent, Severity};
use crate::runtime::slots::{self, SlotOwner, SlotView};
use crate::runtime::tokio_id_u64;
use crate::sink::EventSink;

/// One runtime under watch.
pub(super) struct Watched {
    handle: tokio::runtime::Handle,
    runtime: u64,
    heartbeat: Arc<Heartbeat>,
    /// Polls in progress, by slot index.
    polls: HashMap<usize, PollTrack>,
    /// The heartbeat stall in progress, if any.
    lag: Option<Report>,
    /// The workers' CPU counters while the heartbeat was last on time: the
    /// start of the window a heartbeat stall's CPU accounting covers.
    cpu_before: Option<WorkerCpu>,
    scratch: Vec<SlotView>,
}

struct PollTrack {
    view: SlotView,
    first_seen: Instant,
    report: Option<Report>,
}

/// A stall that was reported: what to repeat and when.
struct Report {
    started: Instant,
    last_sent: Instant,
    /// The identifying part of the event, reused for repeats and the end.
    event: DiagEvent,
}

impl Watched {
    pub(super) fn new(handle: tokio::runtime::Handle, heartbeat: Arc<Heartbeat>) -> Self {
        Self {
            runtime: tokio_id_u64(handle.id()),
            handle,
            heartbeat,
            polls: HashMap::new(),
            lag: None,
            cpu_before: None,
            scratch: Vec::new(),
        }
    }

    pub(super) fn is_gone(&self) -> bool {
        self.heartbeat.is_gone()
    }

    pub(super) fn stop(&self) {
        self.heartbeat.stop();
    }

    /// One look at the runtime; emits what is due.
    pub(super) fn check(&mut self, config: &WatchdogConfig, sink: &EventSink) {
        let now = Instant::now();
        slots::polling(self.runtime, &mut self.scratch);

        // Polls that ended (or were replaced by a newer poll in the same slot).
        let scratch = &self.scratch;
        self.polls.retain(|index, track| {
            let same = scratch
                .iter()
                .any(|v| v.index == *index && v.seq == track.view.seq);
            if !same {
                if let Some(report) = track.report.take() {
                    sink.emit(end_event(report, now));
                }
            }
            same
        });
        for view in &self.scratch {
            self.polls.entry(view.index).or_insert(PollTrack {
                view: *view,
                first_seen: now,
                report: None,
            });
        }

        let workers = self.handle.metrics().num_workers();
        let stuck = self
            .polls
            .values()
            .filter(|t| now.duration_since(t.first_seen) >= config.poll_threshold)
            .count();
        let runtime = self.runtime;
        for (index, track) in &mut self.polls {
            let running = now.duration_since(track.first_seen);
            if running < config.poll_threshold {
                continue;
            }
            let due = match &track.report {
                None => true,
                Some(r) => now.duration_since(r.last_sent) >= config.poll_threshold,
            };
            if !due || !slots::still_polling(&track.view, runtime) {
                continue;
            }
            let event = poll_stall_event(
                &self.handle,
                runtime,
                *index,
                &track.view,
                running,
                config.poll_threshold,
                stuck,
                workers,
            );
            sink.emit(event.clone());
            let started = track
                .report
                .as_ref()
                .map_or(track.first_seen, |r| r.started);
            track.report = Some(Report {
                started,
                last_sent: now,
                event,
            });
        }

        let lag = self.heartbeat.current_lag();
        // Keep the counters from before any lag fresh (at most half a
        // threshold old), reading them only while the heartbeat is on time.
        if lag < config.heartbeat_threshold / 4
            && self
                .cpu_before
                .as_ref()
                .is_none_or(|s| now.duration_since(s.at()) >= config.heartbeat_threshold / 2)
        {
            self.cpu_before = WorkerCpu::take(&self.handle).or(self.cpu_before.take());
        }
        if lag >= config.heartbeat_threshold {
            let due = match &self.lag {
                None => true,
                Some(r) => now.duration_since(r.last_sent) >= config.heartbeat_threshold,
            };
            if due {
                let event = with_worker_cpu(
                    heartbeat_stall_event(
                        runtime,
                        lag,
                        config.heartbeat_threshold,
                        stuck,
                        workers,
                        self.heartbeat.beats(),
                    ),
                    &self.handle,
                    self.cpu_before.as_ref(),
                );
                sink.emit(event.clone());
                let started = self.lag.as_ref().map_or(now - lag, |r| r.started);
                self.lag = Some(Report {
                    started,
                    last_sent: now,
                    event,
                });
            }
        } else if let Some(report) = self.lag.take() {
            let end = end_event(report, now);
            sink.emit(with_worker_cpu(end, &self.handle, self.cpu_before.as_ref()));
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The span a thread is in, as far as the span registry knows.
fn span_on_thread(tid: i64) -> Option<crate::spans::SpanRef> {
    crate::spans::current_span_on_thread(i32::try_from(tid).ok()?)
}

/// The worker index of the thread, per tokio's own numbering.
fn worker_index(handle: &tokio::runtime::Handle, owner: &SlotOwner) -> Option<usize> {
    let metrics = handle.metrics();
    (0..metrics.num_workers()).find(|&i| metrics.worker_thread_id(i) == Some(owner.thread_id))
}

#[allow(clippy::too_many_arguments)]
fn poll_stall_event(
    handle: &tokio::runtime::Handle,
    runtime: u64,
    index: usize,
    view: &SlotView,
    running: Duration,
    threshold: Duration,
    stuck: usize,
    workers: usize,
) -> DiagEvent {
    let owner = slots::owner(index);
    let mut event = DiagEvent::new("kms.stall", Severity::Error, String::new())
        .attr("stall.kind", "poll")
        .attr("stall.duration_ms", millis(running))
        .attr("stall.threshold_ms", millis(threshold))
        .attr("stall.ongoing", true)
        .attr("tokio.runtime.id", runtime)
        .attr("tokio.task.id", view.task);
    let mut body = String::new();
    let mut who = String::from("A worker");
    let mut what = String::new();
    if let Some(owner) = &owner {
        if let Some(worker) = worker_index(handle, owner) {
            event = event.attr("tokio.worker", worker);
        }
        event = event.attr("thread.id", owner.tid);
        who = format!("Worker thread tid {}", owner.tid);
        if let Some(name) = &owner.name {
            event = event.attr("thread.name", name.as_str());
            who = format!("Worker {name} (tid {})", owner.tid);
        }
        if let Some(span) = span_on_thread(owner.tid) {
            let _ = write!(what, " in span {}", span.name);
            event = event.attr("span.name", span.name);
            event = event
                .attr("span.trace_id", hex(&span.trace_id))
                .attr("span.span_id", hex(&span.span_id));
            event.trace_id = Some(span.trace_id);
            event.span_id = Some(span.span_id);
        }
        let os = os_thread::read(owner.tid);
        if let Some(state) = os.state {
            event = event.attr("os.thread.state", state.to_string());
            let _ = write!(what, "; OS thread state {state}");
        }
        if let Some(wchan) = os.wchan {
            let _ = write!(what, " in {wchan}");
            event = event.attr("os.thread.wchan", wchan);
        }
    }
    event = event
        .attr("runtime.workers_stuck", stuck)
        .attr("runtime.workers", workers);
    let _ = write!(
        body,
        "{who} has been polling task {} for {} ms (threshold {} ms){what}.",
        view.task,
        millis(running),
        millis(threshold)
    );
    event.body = body;
    event
}

fn heartbeat_stall_event(
    runtime: u64,
    lag: Duration,
    threshold: Duration,
    stuck: usize,
    workers: usize,
    beats: u64,
) -> DiagEvent {
    let body = format!(
        "Runtime heartbeat is {} ms late (threshold {} ms); {stuck} of {workers} workers are in a poll past the poll threshold.",
        millis(lag),
        millis(threshold)
    );
    DiagEvent::new("kms.stall", Severity::Error, body)
        .attr("stall.kind", "heartbeat")
        .attr("stall.duration_ms", millis(lag))
        .attr("stall.threshold_ms", millis(threshold))
        .attr("stall.ongoing", true)
        .attr("tokio.runtime.id", runtime)
        .attr("heartbeat.lag_ms", millis(lag))
        .attr("heartbeat.beats", beats)
        .attr("runtime.workers_stuck", stuck)
        .attr("runtime.workers", workers)
}

/// Sets the workers' CPU accounting since `before` on a heartbeat stall
/// event (replacing a previous report's). Unchanged when either reading is
/// missing.
fn with_worker_cpu(
    mut event: DiagEvent,
    handle: &tokio::runtime::Handle,
    before: Option<&WorkerCpu>,
) -> DiagEvent {
    let Some((cpu, window)) = before.and_then(|b| Some(WorkerCpu::take(handle)?.since(b))) else {
        return event;
    };
    for (key, value) in worker_cpu::attributes(cpu, window) {
        match event.attributes.iter_mut().find(|(k, _)| *k == key) {
            Some((_, old)) => *old = AttrValue::Int(value),
            None => event.attributes.push((key, AttrValue::Int(value))),
        }
    }
    event
}

/// `kms.stall_end`: the last report's identifying attributes with the total
/// duration (from first sight to this check, so within one check interval).
fn end_event(report: Report, now: Instant) -> DiagEvent {
    let total = now.duration_since(report.started);
    let mut event = report.event;
    event.name = "kms.stall_end";
    event.severity = Severity::Warn;
    event.time = std::time::SystemTime::now();
    for (key, value) in &mut event.attributes {
        match *key {
            "stall.duration_ms" => *value = AttrValue::Int(millis(total)),
            "stall.ongoing" => *value = AttrValue::Bool(false),
            _ => {}
        }
    }
    event.body = format!("Stall over after {} ms: {}", millis(total), event.body);
    event
}
