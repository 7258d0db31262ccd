//! Shared test harness: an in-process OTLP/gRPC receiver (traces + logs) on
//! 127.0.0.1:0, a TCP black hole, and `#[track_caller]` wait helpers that poll
//! a condition until a deadline (never a fixed sleep).
//!
//! The receiver runs on its own OS thread with its own current-thread runtime,
//! so it keeps answering when the runtime under test is wedged.
//!
//! Waiting helpers block the calling thread: call them from a `#[test]`
//! (sync) body, or from `tokio::task::spawn_blocking` inside an async test.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use console_api::instrument::instrument_client::InstrumentClient;
use console_api::instrument::InstrumentRequest;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::trace::v1::Span;

/// How the receiver answers export requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Store the request and answer OK.
    Accept,
    /// Answer `UNAVAILABLE` without storing.
    Unavailable,
    /// Hold the request open without answering until the mode changes
    /// (a collector that accepts and never answers).
    Hang,
}

/// One received span with the context it came in.
#[derive(Debug, Clone)]
pub struct SpanEntry {
    /// Resource attributes of the export it came in.
    pub resource: Vec<KeyValue>,
    /// Instrumentation scope name.
    pub scope: String,
    /// The span.
    pub span: Span,
}

impl SpanEntry {
    /// A string attribute of the span.
    pub fn str_attr(&self, key: &str) -> Option<String> {
        str_attr(&self.span.attributes, key)
    }
    /// An int attribute of the span.
    pub fn int_attr(&self, key: &str) -> Option<i64> {
        int_attr(&self.span.attributes, key)
    }
    /// A bool attribute of the span.
    pub fn bool_attr(&self, key: &str) -> Option<bool> {
        bool_attr(&self.span.attributes, key)
    }
    /// True for an open-span snapshot (`incomplete = true`).
    pub fn is_snapshot(&self) -> bool {
        self.bool_attr("incomplete") == Some(true)
    }
}

/// One received log record (diagnostic event) with its context.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// Resource attributes of the export it came in.
    pub resource: Vec<KeyValue>,
    /// Instrumentation scope name.
    pub scope: String,
    /// The record.
    pub record: LogRecord,
}

impl LogEntry {
    /// The event name (`event_name`, else the `event.name` attribute).
    pub fn name(&self) -> String {
        if !self.record.event_name.is_empty() {
            return self.record.event_name.clone();
        }
        self.str_attr("event.name").unwrap_or_default()
    }
    /// A string attribute of the record.
    pub fn str_attr(&self, key: &str) -> Option<String> {
        str_attr(&self.record.attributes, key)
    }
    /// An int attribute of the record.
    pub fn int_attr(&self, key: &str) -> Option<i64> {
        int_attr(&self.record.attributes, key)
    }
    /// A bool attribute of the record.
    pub fn bool_attr(&self, key: &str) -> Option<bool> {
        bool_attr(&self.record.attributes, key)
    }
    /// The body as a string (empty if not a string).
    pub fn body(&self) -> String {
        match self.record.body.as_ref().and_then(|b| b.value.as_ref()) {
            Some(any_value::Value::StringValue(s)) => s.clone(),
            _ => String::new(),
        }
    }
}

/// Looks up a string attribute.
pub fn str_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    match value(attrs, key)? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// Looks up an int attribute.
pub fn int_attr(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match value(attrs, key)? {
        any_value::Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

/// Looks up a bool attribute.
pub fn bool_attr(attrs: &[KeyValue], key: &str) -> Option<bool> {
    match value(attrs, key)? {
        any_value::Value::BoolValue(b) => Some(*b),
        _ => None,
    }
}

fn value<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

#[derive(Default)]
struct Received {
    traces: Vec<ExportTraceServiceRequest>,
    logs: Vec<ExportLogsServiceRequest>,
    /// Export calls seen, whatever the mode.
    calls: usize,
}

struct Shared {
    received: Mutex<Received>,
    changed: Condvar,
    mode: Mutex<Mode>,
    mode_changed: tokio::sync::watch::Sender<Mode>,
}

impl Shared {
    async fn handle(&self) -> Result<(), tonic::Status> {
        let mut rx = self.mode_changed.subscribe();
        loop {
            let mode = *rx.borrow_and_update();
            match mode {
                Mode::Accept => return Ok(()),
                Mode::Unavailable => {
                    return Err(tonic::Status::unavailable("test receiver unavailable"))
                }
                Mode::Hang => {
                    if rx.changed().await.is_err() {
                        return Err(tonic::Status::unavailable("test receiver stopped"));
                    }
                }
            }
        }
    }

    fn count_call(&self) {
        self.received.lock().unwrap().calls += 1;
        self.changed.notify_all();
    }
}

#[derive(Clone)]
struct Svc(Arc<Shared>);

#[tonic::async_trait]
impl TraceService for Svc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.count_call();
        self.0.handle().await?;
        self.0
            .received
            .lock()
            .unwrap()
            .traces
            .push(request.into_inner());
        self.0.changed.notify_all();
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl LogsService for Svc {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        self.0.count_call();
        self.0.handle().await?;
        self.0
            .received
            .lock()
            .unwrap()
            .logs
            .push(request.into_inner());
        self.0.changed.notify_all();
        Ok(tonic::Response::new(ExportLogsServiceResponse {
            partial_success: None,
        }))
    }
}

/// An in-process OTLP/gRPC receiver (traces and logs) on its own thread.
pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Receiver {
    /// Starts a receiver on 127.0.0.1:0 that accepts everything.
    pub fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap())
    }

    /// Starts a receiver on `addr` (e.g. a port a collector-absent test used
    /// before, to model the collector coming back).
    pub fn start_on(addr: SocketAddr) -> Self {
        let listener = StdTcpListener::bind(addr).expect("bind test receiver");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let (mode_tx, _) = tokio::sync::watch::channel(Mode::Accept);
        let shared = Arc::new(Shared {
            received: Mutex::new(Received::default()),
            changed: Condvar::new(),
            mode: Mutex::new(Mode::Accept),
            mode_changed: mode_tx,
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let svc = Svc(shared.clone());
        let thread = thread::Builder::new()
            .name("test-otlp-receiver".into())
            .spawn(move || {
                // A peer of the app, not part of it: its tasks and spans
                // must not reach the subscriber under test.
                let _quiet = tracing::dispatcher::set_default(&tracing::Dispatch::none());
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("receiver runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    let incoming = tonic::transport::server::TcpIncoming::from(listener);
                    let _ = tonic::transport::Server::builder()
                        .add_service(
                            TraceServiceServer::new(svc.clone())
                                .max_decoding_message_size(64 << 20),
                        )
                        .add_service(
                            LogsServiceServer::new(svc).max_decoding_message_size(64 << 20),
                        )
                        .serve_with_incoming_shutdown(incoming, async {
                            let _ = stop_rx.await;
                        })
                        .await;
                });
            })
            .expect("spawn receiver thread");
        Self {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// The socket address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The OTLP endpoint URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes how it answers from now on.
    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
        self.shared.mode_changed.send_replace(mode);
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<SpanEntry> {
        let received = self.shared.received.lock().unwrap();
        flatten_spans(&received.traces)
    }

    /// Every log record received so far, in arrival order.
    pub fn logs(&self) -> Vec<LogEntry> {
        let received = self.shared.received.lock().unwrap();
        flatten_logs(&received.logs)
    }

    /// Counts received spans matching `pred(span, scope)` without copying them.
    pub fn count_spans(&self, mut pred: impl FnMut(&Span, &str) -> bool) -> usize {
        let received = self.shared.received.lock().unwrap();
        let mut n = 0;
        for req in &received.traces {
            for rs in &req.resource_spans {
                for ss in &rs.scope_spans {
                    let scope = ss.scope.as_ref().map(|s| s.name.as_str()).unwrap_or("");
                    n += ss.spans.iter().filter(|s| pred(s, scope)).count();
                }
            }
        }
        n
    }

    /// Forgets everything received so far.
    pub fn clear(&self) {
        let mut received = self.shared.received.lock().unwrap();
        received.traces.clear();
        received.logs.clear();
    }

    /// Log records whose event name is `name`.
    pub fn events(&self, name: &str) -> Vec<LogEntry> {
        self.logs()
            .into_iter()
            .filter(|l| l.name() == name)
            .collect()
    }

    /// Export calls seen (traces + logs), whatever the mode.
    pub fn calls(&self) -> usize {
        self.shared.received.lock().unwrap().calls
    }

    /// Raw requests received so far (for whole-payload checks such as secrets).
    pub fn requests(
        &self,
    ) -> (
        Vec<ExportTraceServiceRequest>,
        Vec<ExportLogsServiceRequest>,
    ) {
        let received = self.shared.received.lock().unwrap();
        (received.traces.clone(), received.logs.clone())
    }

    /// Everything received, as one debug-formatted string plus the raw
    /// protobuf bytes rendered lossily, for "this secret appears nowhere" checks.
    pub fn everything_as_text(&self) -> String {
        use prost::Message;
        let (traces, logs) = self.requests();
        let mut text = format!("{traces:?}\n{logs:?}\n");
        for t in &traces {
            text.push_str(&String::from_utf8_lossy(&t.encode_to_vec()));
        }
        for l in &logs {
            text.push_str(&String::from_utf8_lossy(&l.encode_to_vec()));
        }
        text
    }

    /// Blocks until `done` holds for the receiver, or panics after `timeout`
    /// with `what` and a summary of what was received.
    #[track_caller]
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&Receiver) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; received {}",
                    self.summary()
                );
            }
            // Wake on every new request, and at least every 50 ms so that
            // conditions that depend on other state are re-checked.
            let guard = self.shared.received.lock().unwrap();
            let wait = (deadline - now).min(Duration::from_millis(50));
            drop(self.shared.changed.wait_timeout(guard, wait).unwrap());
        }
    }

    /// Waits for a span matching `pred` and returns it.
    #[track_caller]
    pub fn wait_for_span(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&SpanEntry) -> bool,
    ) -> SpanEntry {
        let mut found = None;
        self.wait_until(what, timeout, |r| {
            found = r.spans().into_iter().find(|s| pred(s));
            found.is_some()
        });
        found.expect("found")
    }

    /// Waits for a closed (not snapshot) span named `name`.
    #[track_caller]
    pub fn wait_for_span_named(&self, name: &str, timeout: Duration) -> SpanEntry {
        self.wait_for_span(&format!("closed span {name:?}"), timeout, |s| {
            s.span.name == name && !s.is_snapshot()
        })
    }

    /// Waits for a log record matching `pred` and returns it.
    #[track_caller]
    pub fn wait_for_log(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&LogEntry) -> bool,
    ) -> LogEntry {
        let mut found = None;
        self.wait_until(what, timeout, |r| {
            found = r.logs().into_iter().find(|l| pred(l));
            found.is_some()
        });
        found.expect("found")
    }

    /// Waits for a diagnostic event named `name` (e.g. `kms.stall`).
    #[track_caller]
    pub fn wait_for_event(&self, name: &str, timeout: Duration) -> LogEntry {
        self.wait_for_log(&format!("event {name:?}"), timeout, |l| l.name() == name)
    }

    /// A short description of what was received, for failure messages.
    pub fn summary(&self) -> String {
        let spans = self.spans();
        let logs = self.logs();
        let mut span_names: Vec<String> = spans
            .iter()
            .map(|s| {
                if s.is_snapshot() {
                    format!("{}(snapshot)", s.span.name)
                } else {
                    s.span.name.clone()
                }
            })
            .collect();
        span_names.dedup();
        let mut log_names: Vec<String> = logs.iter().map(|l| l.name()).collect();
        log_names.dedup();
        format!(
            "{} calls, {} spans {:?}, {} log records {:?}",
            self.calls(),
            spans.len(),
            span_names,
            logs.len(),
            log_names
        )
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.set_mode(Mode::Unavailable);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn flatten_spans(traces: &[ExportTraceServiceRequest]) -> Vec<SpanEntry> {
    let mut out = Vec::new();
    for req in traces {
        for rs in &req.resource_spans {
            let resource = rs
                .resource
                .as_ref()
                .map(|r| r.attributes.clone())
                .unwrap_or_default();
            for ss in &rs.scope_spans {
                let scope = ss
                    .scope
                    .as_ref()
                    .map(|s| s.name.clone())
                    .unwrap_or_default();
                for span in &ss.spans {
                    out.push(SpanEntry {
                        resource: resource.clone(),
                        scope: scope.clone(),
                        span: span.clone(),
                    });
                }
            }
        }
    }
    out
}

fn flatten_logs(logs: &[ExportLogsServiceRequest]) -> Vec<LogEntry> {
    let mut out = Vec::new();
    for req in logs {
        for rl in &req.resource_logs {
            let resource = rl
                .resource
                .as_ref()
                .map(|r| r.attributes.clone())
                .unwrap_or_default();
            for sl in &rl.scope_logs {
                let scope = sl
                    .scope
                    .as_ref()
                    .map(|s| s.name.clone())
                    .unwrap_or_default();
                for record in &sl.log_records {
                    out.push(LogEntry {
                        resource: resource.clone(),
                        scope: scope.clone(),
                        record: record.clone(),
                    });
                }
            }
        }
    }
    out
}

/// A TCP listener that accepts connections and never reads or answers: a
/// black-holed collector. Runs on its own thread until dropped.
pub struct BlackHole {
    addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl BlackHole {
    /// Starts one on 127.0.0.1:0.
    pub fn start() -> Self {
        let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind black hole");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = thread::Builder::new()
            .name("test-black-hole".into())
            .spawn(move || {
                let mut held = Vec::new();
                while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((sock, _)) => held.push(sock),
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
            .expect("spawn black hole");
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// The OTLP endpoint URL pointing at it.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A loopback address with nothing listening on it (bound, then released).
pub fn unused_addr() -> SocketAddr {
    let l = StdTcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// Polls `cond` until it holds, or panics with `what` after `timeout`.
#[track_caller]
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The names of every task the tokio-console server at `addr` lists,
/// gathered by a real console-api client from its updates until `done` holds
/// or `timeout` passes. Blocks: call it outside a runtime.
pub fn console_task_names(
    addr: SocketAddr,
    timeout: Duration,
    done: impl Fn(&BTreeSet<String>) -> bool,
) -> BTreeSet<String> {
    // Its own runtime, with no subscriber: the client's tasks are not the
    // app's and must not take the app's places in the console.
    let _quiet = tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut names = BTreeSet::new();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut client = InstrumentClient::connect(format!("http://{addr}"))
            .await
            .expect("connect to the console port");
        let mut updates = client
            .watch_updates(InstrumentRequest {})
            .await
            .expect("watch updates")
            .into_inner();
        while !done(&names) {
            let Ok(Ok(Some(update))) = tokio::time::timeout_at(deadline, updates.message()).await
            else {
                break;
            };
            for task in update.task_update.into_iter().flat_map(|u| u.new_tasks) {
                for field in task.fields {
                    if field
                        .name
                        .as_ref()
                        .is_some_and(|n| format!("{n:?}").contains("task.name"))
                    {
                        match field.value {
                            Some(console_api::field::Value::StrVal(v))
                            | Some(console_api::field::Value::DebugVal(v)) => {
                                names.insert(v);
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        names
    })
}

/// An always-ready task's body: polls of `poll` of CPU each, yielding
/// between them, while `go_on` says so. Keeps a worker busy with short
/// polls (tokio adds a worker's busy time when it parks or between polls,
/// never mid-poll).
pub async fn spin_in_short_polls(poll: Duration, go_on: impl Fn() -> bool) {
    while go_on() {
        let started = Instant::now();
        while started.elapsed() < poll {
            std::hint::spin_loop();
        }
        tokio::task::yield_now().await;
    }
}
