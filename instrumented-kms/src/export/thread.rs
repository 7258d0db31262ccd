//! The `kms-diag-export` thread: a current-thread runtime and a tonic client.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::resource::v1::Resource;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::encode::{self, ResourceInfo};
use super::queue::{ExportQueue, Item};
use super::transport::AddHeaders;
use crate::event::{DiagEvent, Severity};

/// Name of the export thread.
pub(crate) const THREAD_NAME: &str = "kms-diag-export";

/// Largest number of items in one export request.
const MAX_BATCH: usize = 512;
/// First wait after a failed export; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Drops are reported at most this often.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(1);

/// What the export thread needs.
#[derive(Debug, Clone)]
pub(crate) struct ExportConfig {
    pub(crate) endpoint: Endpoint,
    /// Added to every call (e.g. the collector's bearer token).
    pub(crate) headers: crate::access::OtlpHeaders,
    pub(crate) timeout: Duration,
    pub(crate) flush_interval: Duration,
    pub(crate) resource: ResourceInfo,
}

type Traces = TraceServiceClient<InterceptedService<Channel, AddHeaders>>;
type Logs = LogsServiceClient<InterceptedService<Channel, AddHeaders>>;

/// Owner of the export thread.
#[derive(Debug)]
pub(crate) struct ExportHandle {
    pub(crate) queue: Arc<ExportQueue>,
    done: mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
    deadline: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl ExportHandle {
    /// Flushes what is queued (priority first) until `deadline`, then stops
    /// the thread. Returns whether it finished in time.
    pub(crate) fn shutdown(&mut self, deadline: Instant) -> bool {
        *self
            .deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(deadline);
        self.queue.close();
        let wait = deadline.saturating_duration_since(Instant::now());
        let finished = !matches!(
            self.done.recv_timeout(wait),
            Err(mpsc::RecvTimeoutError::Timeout)
        );
        if finished {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        // Otherwise the thread is left to die with the process: never block
        // the host's shutdown on a dead collector.
        finished
    }
}

/// Starts the export thread.
pub(crate) fn spawn(
    queue: Arc<ExportQueue>,
    config: ExportConfig,
) -> Result<ExportHandle, crate::InitError> {
    let headers = AddHeaders::new(&config.headers)?;
    let (done_tx, done) = mpsc::channel();
    let deadline = Arc::new(std::sync::Mutex::new(None));
    let thread = {
        let queue = queue.clone();
        let deadline = deadline.clone();
        // Never instrument ourselves: tokio, hyper and tonic on this thread
        // report to no subscriber.
        crate::quiet_thread::spawn(THREAD_NAME, move |ready| {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(THREAD_NAME)
                .build()
            {
                Ok(rt) => rt.block_on(async move {
                    // Register tokio's spawn callsite before init returns
                    // (see `quiet_thread`); the exporter spawns later.
                    drop(tokio::spawn(async {}));
                    ready.signal();
                    Exporter::new(queue, config, deadline).run(headers).await
                }),
                Err(e) => eprintln!("instrumented-kms: cannot start the export runtime: {e}"),
            }
            let _ = done_tx.send(());
        })
        .map_err(|source| crate::InitError::SpawnThread {
            thread: THREAD_NAME,
            source,
        })?
    };
    Ok(ExportHandle {
        queue,
        done,
        thread: Some(thread),
        deadline,
    })
}

struct Exporter {
    queue: Arc<ExportQueue>,
    config: ExportConfig,
    resource: Resource,
    deadline: Arc<std::sync::Mutex<Option<Instant>>>,
    /// Drop totals at the last report.
    reported: (u64, u64),
    last_report: Option<Instant>,
    /// Whether the last export failed (for one log line per outage).
    failing: bool,
}

/// What one batch turned into.
#[derive(Default)]
struct Batch {
    closed: Vec<opentelemetry_proto::tonic::trace::v1::Span>,
    snapshots: Vec<opentelemetry_proto::tonic::trace::v1::Span>,
    records: Vec<opentelemetry_proto::tonic::logs::v1::LogRecord>,
    /// Priority items of the trace request, kept for a retry.
    retry_spans: Vec<Item>,
    /// Priority items of the logs request, kept for a retry.
    retry_events: Vec<Item>,
    ordinary_spans: u64,
    ordinary_events: u64,
}

impl Exporter {
    fn new(
        queue: Arc<ExportQueue>,
        config: ExportConfig,
        deadline: Arc<std::sync::Mutex<Option<Instant>>>,
    ) -> Self {
        let resource = encode::resource(&config.resource);
        Self {
            queue,
            config,
            resource,
            deadline,
            reported: (0, 0),
            last_report: None,
            failing: false,
        }
    }

    async fn run(mut self, headers: AddHeaders) {
        let channel = self
            .config
            .endpoint
            .clone()
            .connect_timeout(self.config.timeout)
            .timeout(self.config.timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        let mut traces = TraceServiceClient::with_interceptor(channel.clone(), headers.clone());
        let mut logs = LogsServiceClient::with_interceptor(channel, headers);
        let mut backoff: Option<Duration> = None;
        loop {
            if self.queue.is_closing() {
                self.flush(&mut traces, &mut logs).await;
                return;
            }
            match backoff {
                Some(wait) => {
                    // Only shutdown cuts a backoff short.
                    let until = Instant::now() + wait;
                    while Instant::now() < until && !self.queue.is_closing() {
                        tokio::select! {
                            _ = self.queue.wake.notified() => {}
                            _ = tokio::time::sleep_until(until.into()) => {}
                        }
                    }
                }
                None if self.queue.is_empty() => {
                    tokio::select! {
                        _ = self.queue.wake.notified() => {}
                        _ = tokio::time::sleep(self.config.flush_interval) => {}
                    }
                }
                None => {}
            }
            if self.queue.is_closing() {
                continue;
            }
            let ok = self.export_once(&mut traces, &mut logs).await;
            backoff = if ok {
                None
            } else {
                Some(backoff.map_or(MIN_BACKOFF, |b| (b * 2).min(MAX_BACKOFF)))
            };
        }
    }

    /// Drains the queue until empty or the shutdown deadline.
    async fn flush(&mut self, traces: &mut Traces, logs: &mut Logs) {
        let deadline = self
            .deadline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        let _ = tokio::time::timeout_at(deadline.into(), async {
            while !self.queue.is_empty() {
                if !self.export_once(traces, logs).await {
                    // Collector down at shutdown: what is left is lost.
                    break;
                }
            }
        })
        .await;
    }

    fn take_batch(&self) -> Batch {
        let mut batch = Batch::default();
        for item in self.queue.take(MAX_BATCH) {
            match item {
                Item::Closed(span) => {
                    let proto = encode::closed_span(&span);
                    if span.priority {
                        batch.retry_spans.push(Item::Encoded(proto.clone()));
                    } else {
                        batch.ordinary_spans += 1;
                    }
                    batch.closed.push(proto);
                }
                Item::Encoded(proto) => {
                    batch.retry_spans.push(Item::Encoded(proto.clone()));
                    batch.closed.push(proto);
                }
                Item::Snapshot(proto) => {
                    batch.retry_spans.push(Item::Snapshot(proto.clone()));
                    batch.snapshots.push(proto);
                }
                Item::Event(event) => {
                    batch.records.push(encode::log_record(&event));
                    if event.severity == Severity::Info {
                        batch.ordinary_events += 1;
                    } else {
                        batch.retry_events.push(Item::Event(event));
                    }
                }
            }
        }
        batch
    }

    /// Sends one batch. Returns false when an export failed.
    async fn export_once(&mut self, traces: &mut Traces, logs: &mut Logs) -> bool {
        let batch = self.take_batch();
        let mut ok = true;
        let span_count = (batch.closed.len() + batch.snapshots.len()) as u64;
        if span_count > 0 {
            let request = encode::trace_request(&self.resource, batch.closed, batch.snapshots);
            match tokio::time::timeout(self.config.timeout, traces.export(request)).await {
                Ok(Ok(_)) => {
                    self.queue
                        .exported_spans
                        .fetch_add(span_count, Ordering::Relaxed);
                }
                Ok(Err(status)) => {
                    self.failed(&format!("{}: {}", status.code(), status.message()));
                    ok = false;
                }
                Err(_) => {
                    self.failed("timed out");
                    ok = false;
                }
            }
            if !ok {
                for _ in 0..batch.ordinary_spans {
                    self.queue.count_drop(&Item::Encoded(Default::default()));
                }
                self.queue.requeue_front(batch.retry_spans);
            }
        }
        let event_count = batch.records.len() as u64;
        if event_count > 0 {
            let mut logs_ok = false;
            if ok {
                let request = encode::logs_request(&self.resource, batch.records);
                match tokio::time::timeout(self.config.timeout, logs.export(request)).await {
                    Ok(Ok(_)) => {
                        self.queue
                            .exported_events
                            .fetch_add(event_count, Ordering::Relaxed);
                        logs_ok = true;
                    }
                    Ok(Err(status)) => {
                        self.failed(&format!("{}: {}", status.code(), status.message()))
                    }
                    Err(_) => self.failed("timed out"),
                }
            }
            if !logs_ok {
                ok = false;
                let placeholder = Item::Event(DiagEvent::new("", Severity::Info, ""));
                for _ in 0..batch.ordinary_events {
                    self.queue.count_drop(&placeholder);
                }
                self.queue.requeue_front(batch.retry_events);
            }
        }
        self.queue.in_flight.store(0, Ordering::Relaxed);
        if ok {
            if self.failing && span_count + event_count > 0 {
                self.failing = false;
                eprintln!(
                    "instrumented-kms: collector {} reachable again; exporting.",
                    self.config.endpoint.uri()
                );
            }
            self.report_drops();
        }
        ok
    }

    fn failed(&mut self, why: &str) {
        if !self.failing {
            self.failing = true;
            eprintln!(
                "instrumented-kms: export to {} failed ({why}); dropping ordinary spans and retrying. Further failures are counted, not logged.",
                self.config.endpoint.uri()
            );
        }
    }

    /// After a successful export: report drops since the last report.
    fn report_drops(&mut self) {
        let (spans, events) = self.queue.dropped();
        if (spans, events) == self.reported {
            return;
        }
        if self
            .last_report
            .is_some_and(|t| t.elapsed() < DROP_REPORT_EVERY && !self.queue.is_closing())
        {
            return;
        }
        let new_spans = spans - self.reported.0;
        let new_events = events - self.reported.1;
        self.reported = (spans, events);
        self.last_report = Some(Instant::now());
        self.queue.push_priority(Item::Event(
            DiagEvent::new(
                "kms.export_drops",
                Severity::Warn,
                format!("Export dropped {new_spans} spans and {new_events} events since the last report."),
            )
            .attr("export.dropped_spans", new_spans)
            .attr("export.dropped_events", new_events)
            .attr("export.dropped_spans_total", spans)
            .attr("export.dropped_events_total", events),
        ));
    }
}
