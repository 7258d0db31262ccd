//! [`DiagGuard`]: owns the diagnostic threads; flushes and stops them.

use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::Layer;

use crate::builder::{Builder, DiagLayer, Settings};
use crate::error::InitError;
use crate::event::{DiagEvent, Severity};
use crate::sink::EventSink;
use crate::spans::{ClosedSpanSink, DiscardClosed, OpenSpans, SpanLayer};

/// Export counters, from [`DiagGuard::export_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExportStats {
    /// Items waiting in the export queue now (both lanes).
    pub queued: usize,
    /// Items taken by the exporter and not yet delivered or dropped.
    pub in_flight: usize,
    /// Capacity of the ordinary lane.
    pub ordinary_capacity: usize,
    /// Capacity of the priority lane.
    pub priority_capacity: usize,
    /// Spans dropped since start (queue full, or the export failed).
    pub dropped_spans: u64,
    /// Events dropped since start.
    pub dropped_events: u64,
    /// Ordinary spans not exported because their trace was not sampled
    /// (see [`Builder::trace_rate_limit`]).
    pub sampled_out_spans: u64,
    /// Open-span snapshots taken (each goes to the priority lane).
    pub snapshots: u64,
    /// Spans (closed and snapshots) the collector accepted.
    pub exported_spans: u64,
    /// Events the collector accepted.
    pub exported_events: u64,
}

/// Keeps the diagnostics running. Dropping it (or calling
/// [`shutdown`](Self::shutdown)) stops the diagnostic threads and gives the
/// exporter a bounded time to flush what it holds
/// ([`Builder::DEFAULT_SHUTDOWN_TIMEOUT`] on drop).
pub struct DiagGuard {
    settings: Settings,
    sink: EventSink,
    #[cfg(feature = "otlp")]
    export: Option<crate::export::ExportHandle>,
    #[cfg(feature = "otlp")]
    reporter: Option<crate::spans::reporter::ReporterHandle>,
    #[cfg(feature = "watchdog")]
    watchdog: Option<crate::watchdog::WatchdogHandle>,
    #[cfg(feature = "runtime-metrics")]
    metrics: Option<crate::metrics::MetricsHandle>,
    #[cfg(any(feature = "taskdump", feature = "taskdump-cfg"))]
    taskdump: Option<crate::taskdump::TaskdumpHandle>,
    /// Dropping a sender stops its thread.
    stops: Vec<mpsc::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    console_addr: Option<std::net::SocketAddr>,
    stopped: bool,
}

impl std::fmt::Debug for DiagGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiagGuard")
            .field("settings", &self.settings)
            .field("threads", &self.threads.len())
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

impl DiagGuard {
    /// Watches a runtime: the stall watchdog's heartbeat task (feature
    /// `watchdog`) and `RuntimeMonitor` sampling (feature `runtime-metrics`).
    /// Poll stalls are seen only on runtimes built by
    /// [`runtime_builder`](crate::runtime_builder). Without those features
    /// this does nothing.
    ///
    /// `runtime.blocking_threads_max` is not exported: the library cannot
    /// read it from the runtime. Use [`watch_runtime_with`](Self::watch_runtime_with)
    /// to tell it.
    pub fn watch_runtime(&self, handle: &tokio::runtime::Handle) {
        self.watch_runtime_with(handle, crate::RuntimeLimits::default());
    }

    /// Like [`watch_runtime`](Self::watch_runtime), for a runtime whose
    /// configured limits the host knows (exported with each `kms.runtime`
    /// sample, e.g. `runtime.blocking_threads_max`).
    ///
    /// # Examples
    ///
    /// ```
    /// use instrumented_kms::RuntimeLimits;
    ///
    /// let (_layer, guard) = instrumented_kms::Builder::default()
    ///     .otlp_enabled(false)
    ///     .console_enabled(false)
    ///     .build()?;
    /// let rt = instrumented_kms::runtime_builder(Some(1))
    ///     .max_blocking_threads(16)
    ///     .build()?;
    /// guard.watch_runtime_with(rt.handle(), RuntimeLimits::default().max_blocking_threads(16));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn watch_runtime_with(
        &self,
        handle: &tokio::runtime::Handle,
        limits: crate::RuntimeLimits,
    ) {
        // With `Builder::build`, the host installs the subscriber itself; by the
        // time it watches its runtime the subscriber is in place, so make sure no
        // callsite (tokio's spawn, above all) kept an interest cached before it.
        tracing::callsite::rebuild_interest_cache();
        #[cfg(feature = "watchdog")]
        if let Some(w) = &self.watchdog {
            w.watch_runtime(handle);
        }
        #[cfg(feature = "runtime-metrics")]
        if let Some(m) = &self.metrics {
            m.watch_runtime(handle, limits);
        }
        #[cfg(any(feature = "taskdump", feature = "taskdump-cfg"))]
        if let Some(t) = &self.taskdump {
            t.watch_runtime(handle);
        }
        let _ = (handle, limits);
    }

    /// The sink diagnostic events go to (the export queue when OTLP is on,
    /// the log for `Warn`/`Error` events always). Hosts may emit their own
    /// [`DiagEvent`]s through it.
    pub fn sink(&self) -> EventSink {
        self.sink.clone()
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The address the tokio-console server listens on, if it runs (useful
    /// with a bind port of 0).
    pub fn console_addr(&self) -> Option<std::net::SocketAddr> {
        self.console_addr
    }

    /// Export counters; `None` when OTLP export is off or not built.
    pub fn export_stats(&self) -> Option<ExportStats> {
        #[cfg(feature = "otlp")]
        if let Some(e) = &self.export {
            return Some(e.queue.stats());
        }
        None
    }

    /// Stops the diagnostic threads and flushes the export queue, taking at
    /// most about `timeout`. Returns whether everything finished in time.
    pub fn shutdown(mut self, timeout: Duration) -> bool {
        self.stop(timeout)
    }

    fn stop(&mut self, timeout: Duration) -> bool {
        if self.stopped {
            return true;
        }
        self.stopped = true;
        let deadline = Instant::now() + timeout;
        self.stops.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        #[allow(unused_mut)]
        let mut finished = true;
        #[cfg(feature = "otlp")]
        {
            if let Some(mut r) = self.reporter.take() {
                r.shutdown();
            }
            if let Some(mut e) = self.export.take() {
                finished = e.shutdown(deadline);
            }
        }
        let _ = deadline;
        finished
    }

    /// Emits `kms.startup`: the debug warning and the settings in force.
    pub(crate) fn announce(&self) {
        let s = &self.settings;
        let mut parts = Vec::new();
        if cfg!(feature = "otlp") && s.otlp {
            parts.push(format!("otlp={}", s.otlp_endpoint));
        }
        if cfg!(feature = "console") && s.console {
            parts.push(format!("console={}", s.console_bind));
        }
        let mut event = DiagEvent::new(
            "kms.startup",
            Severity::Warn,
            format!(
                "Debug instrumentation is on: runtime internals are exported ({}).",
                parts.join(", ")
            ),
        )
        .attr("service.name", s.service_name.as_str())
        .attr("service.version", s.service_version.as_str())
        .attr("config.otlp_endpoint", s.otlp_endpoint.as_str())
        .attr("config.console_bind", s.console_bind.to_string())
        .attr("config.console_event_buffer", s.console_event_buffer)
        .attr("config.console_timers", s.console_timers)
        .attr("config.console_max_tasks", s.console_max_tasks);
        for (key, duration) in [
            ("config.console_retention_ms", s.console_retention),
            ("config.open_span_threshold_ms", s.open_span_threshold),
            ("config.open_span_interval_ms", s.open_span_interval),
            ("config.stall_poll_threshold_ms", s.stall_poll_threshold),
            (
                "config.stall_heartbeat_threshold_ms",
                s.stall_heartbeat_threshold,
            ),
            (
                "config.deadlock_check_interval_ms",
                s.deadlock_check_interval,
            ),
            ("config.metrics_interval_ms", s.metrics_interval),
            ("config.process_interval_ms", s.process_interval),
            ("config.taskdump_timeout_ms", s.taskdump_timeout),
        ] {
            event = event.attr(key, duration.as_millis() as u64);
        }
        let features = [
            ("console", cfg!(feature = "console")),
            ("otlp", cfg!(feature = "otlp")),
            ("runtime-metrics", cfg!(feature = "runtime-metrics")),
            ("deadlock-detection", cfg!(feature = "deadlock-detection")),
            ("watchdog", cfg!(feature = "watchdog")),
            ("process-facts", cfg!(feature = "process-facts")),
            (
                "taskdump",
                cfg!(any(feature = "taskdump", feature = "taskdump-cfg")),
            ),
        ];
        let event = event.attr(
            "config.features",
            features
                .iter()
                .filter(|(_, on)| *on)
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(","),
        );
        self.sink.emit(event);
    }
}

impl Drop for DiagGuard {
    fn drop(&mut self) {
        self.stop(Builder::DEFAULT_SHUTDOWN_TIMEOUT);
    }
}

/// Targets our span layer never tracks: tokio's own instrumentation and the
/// transport crates (which would otherwise trace our own export).
const UNTRACKED_TARGETS: &[&str] = &[
    "tokio",
    // tokio's resource and async-op spans; not a bare "runtime", which would
    // also match an application module such as `runtime_diagnostics`.
    "runtime::resource",
    "h2",
    "hyper",
    "hyper_util",
    "tonic",
    "tower",
    "console_subscriber",
    "instrumented_kms::diag",
];

fn span_filter() -> Targets {
    UNTRACKED_TARGETS.iter().fold(
        Targets::new().with_default(LevelFilter::INFO),
        |t, target| t.with_target(*target, LevelFilter::OFF),
    )
}

#[allow(dead_code)]
fn spawn_error(thread: &'static str) -> impl FnOnce(std::io::Error) -> InitError {
    move |source| InitError::SpawnThread { thread, source }
}

/// Where `kms.process` samples go: with OTLP export on, each also carries
/// the export queue's state (`export.*`), so a long run shows whether the
/// queue keeps up.
#[cfg(feature = "process-facts")]
fn process_sink(guard: &DiagGuard) -> EventSink {
    #[cfg(feature = "otlp")]
    if let Some(export) = &guard.export {
        let queue = export.queue.clone();
        let sink = guard.sink.clone();
        return EventSink::new(move |event| {
            let stats = queue.stats();
            sink.emit(
                event
                    .attr("export.queued", stats.queued)
                    .attr("export.in_flight", stats.in_flight)
                    .attr("export.dropped_spans_total", stats.dropped_spans)
                    .attr("export.dropped_events_total", stats.dropped_events)
                    .attr("export.exported_spans_total", stats.exported_spans),
            )
        });
    }
    guard.sink.clone()
}

/// Starts everything the settings ask for.
pub(crate) fn start(settings: Settings) -> Result<(DiagLayer, DiagGuard), InitError> {
    let mut layers: Vec<DiagLayer> = Vec::new();
    #[allow(unused_mut)]
    let mut guard = DiagGuard {
        settings: settings.clone(),
        sink: EventSink::log_only(),
        #[cfg(feature = "otlp")]
        export: None,
        #[cfg(feature = "otlp")]
        reporter: None,
        #[cfg(feature = "watchdog")]
        watchdog: None,
        #[cfg(feature = "runtime-metrics")]
        metrics: None,
        #[cfg(any(feature = "taskdump", feature = "taskdump-cfg"))]
        taskdump: None,
        stops: Vec::new(),
        threads: Vec::new(),
        console_addr: None,
        stopped: false,
    };

    if settings.log {
        layers.push(crate::logs::layer(&settings.log_filter));
    }

    let open = Arc::new(OpenSpans::new());
    #[allow(unused_mut)]
    let mut closed: Option<Arc<dyn ClosedSpanSink>> = None;

    #[cfg(feature = "otlp")]
    if settings.otlp {
        use crate::export::{self, ExportConfig, ExportQueue};
        let endpoint = export::endpoint(&settings)?;
        let queue = Arc::new(ExportQueue::new(settings.export_queue_capacity, 512));
        let handle = export::spawn(
            queue.clone(),
            ExportConfig {
                endpoint,
                headers: settings.otlp_headers.clone(),
                timeout: settings.export_timeout,
                flush_interval: Duration::from_millis(500),
                resource: export::encode::ResourceInfo {
                    service_name: settings.service_name.clone(),
                    service_version: settings.service_version.clone(),
                },
            },
        )?;
        guard.export = Some(handle);
        let sink_queue = queue.clone();
        guard.sink = EventSink::new(move |event| {
            crate::sink::log_event(&event);
            sink_queue.push_event(event);
        });
        guard.reporter = Some(
            crate::spans::reporter::spawn(
                open.clone(),
                queue.clone(),
                settings.open_span_threshold,
                settings.open_span_interval,
            )
            .map_err(spawn_error(crate::spans::reporter::THREAD_NAME))?,
        );
        closed = Some(queue);

        // Task dumps are exported as events: only with OTLP on.
        #[cfg(any(feature = "taskdump", feature = "taskdump-cfg"))]
        if settings.taskdump {
            let (stop, stopped) = mpsc::channel();
            let config = crate::taskdump::TaskdumpConfig {
                threshold: settings.open_span_threshold,
                interval: settings.open_span_interval,
                timeout: settings.taskdump_timeout,
            };
            let (handle, thread) =
                crate::taskdump::spawn(config, open.clone(), guard.sink.clone(), stopped)
                    .map_err(spawn_error(crate::taskdump::THREAD_NAME))?;
            guard.taskdump = Some(handle);
            guard.stops.push(stop);
            guard.threads.push(thread);
        }
    }

    // After the export: the console reports its drops through the sink.
    #[cfg(feature = "console")]
    if settings.console {
        let config = crate::console::ConsoleConfig {
            bind: settings.console_bind.clone(),
            retention: settings.console_retention,
            max_tasks: settings.console_max_tasks,
            event_buffer: settings.console_event_buffer,
            timers: settings.console_timers,
            report_interval: settings.metrics_interval,
        };
        let (layer, addr) = crate::console::start(&config, guard.sink.clone())?;
        layers.push(layer);
        guard.console_addr = addr;
    }

    let track_threads = cfg!(feature = "watchdog");
    if closed.is_some() || track_threads {
        let sink = closed.unwrap_or_else(|| Arc::new(DiscardClosed));
        layers.push(
            SpanLayer::new(
                open,
                sink,
                settings.open_span_threshold,
                track_threads,
                crate::spans::Sampler::new(settings.trace_rate_limit),
            )
            .with_filter(span_filter())
            .boxed(),
        );
    }

    #[cfg(feature = "watchdog")]
    {
        let (stop, stopped) = mpsc::channel();
        let config = crate::watchdog::WatchdogConfig {
            poll_threshold: settings.stall_poll_threshold,
            heartbeat_threshold: settings.stall_heartbeat_threshold,
        };
        let (handle, thread) = crate::watchdog::spawn(config, guard.sink.clone(), stopped)
            .map_err(spawn_error("kms-diag-watchdog"))?;
        guard.watchdog = Some(handle);
        guard.stops.push(stop);
        guard.threads.push(thread);
    }

    #[cfg(feature = "deadlock-detection")]
    {
        let (stop, stopped) = mpsc::channel();
        let config = crate::deadlock::DeadlockConfig {
            interval: settings.deadlock_check_interval,
        };
        let thread = crate::deadlock::spawn(config, guard.sink.clone(), stopped)
            .map_err(spawn_error("kms-diag-deadlock"))?;
        guard.stops.push(stop);
        guard.threads.push(thread);
    }

    #[cfg(feature = "runtime-metrics")]
    {
        let (stop, stopped) = mpsc::channel();
        let config = crate::metrics::MetricsConfig {
            interval: settings.metrics_interval,
        };
        let (handle, thread) = crate::metrics::spawn(config, guard.sink.clone(), stopped)
            .map_err(spawn_error("kms-diag-metrics"))?;
        guard.metrics = Some(handle);
        guard.stops.push(stop);
        guard.threads.push(thread);
    }

    #[cfg(feature = "process-facts")]
    {
        let (stop, stopped) = mpsc::channel();
        let config = crate::process::ProcessConfig {
            interval: settings.process_interval,
            listen_port: settings.listen_port,
            memory_limit: settings.memory_limit,
        };
        let thread = crate::process::spawn(config, process_sink(&guard), stopped)
            .map_err(spawn_error("kms-diag-process"))?;
        guard.stops.push(stop);
        guard.threads.push(thread);
    }

    let layer: DiagLayer = Box::new(layers);
    Ok((layer, guard))
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::span_filter;

    #[test]
    fn span_filter_skips_tokio_resources_but_not_app_modules_named_runtime() {
        let filter = span_filter();
        assert!(!filter.would_enable("runtime::resource::async_op", &Level::INFO));
        assert!(!filter.would_enable("tokio::task", &Level::INFO));
        assert!(filter.would_enable("runtime_diagnostics", &Level::INFO));
        assert!(filter.would_enable("dstack_kms::main_service", &Level::INFO));
    }
}
