//! Async stack traces of stuck requests (feature `taskdump`), end to end: a
//! real runtime, a request task stuck on a future nobody wakes, the library's
//! own exporter and an in-process OTLP receiver.
//!
//! One diagnostics setup (global subscriber, one guard) serves both tests;
//! each builds its own runtime and picks out its events by `tokio.runtime.id`.
#![cfg(all(feature = "taskdump", tokio_unstable))]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use instrumented_kms::{request_span, runtime_builder, Builder, DiagGuard, HttpProtocol};
use support::{LogEntry, Receiver};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

const THRESHOLD: Duration = Duration::from_millis(300);
const INTERVAL: Duration = Duration::from_millis(200);
const DUMP_TIMEOUT: Duration = Duration::from_millis(800);
const WAIT: Duration = Duration::from_secs(20);

struct Env {
    receiver: Receiver,
    /// `DiagGuard` is not `Sync`; the tests only call `watch_runtime`.
    guard: Mutex<DiagGuard>,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let receiver = Receiver::start();
        let (layer, guard) = Builder::default()
            .service_name("test-kms")
            .otlp_endpoint(receiver.endpoint())
            .console_enabled(false)
            .log_enabled(false)
            .taskdump_enabled(true)
            .open_span_threshold(THRESHOLD)
            .open_span_interval(INTERVAL)
            .taskdump_timeout(DUMP_TIMEOUT)
            .build()
            .expect("build diagnostics");
        // Global: request spans are entered on the runtime's worker threads.
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
            .expect("global subscriber");
        Env {
            receiver,
            guard: Mutex::new(guard),
        }
    })
}

fn watched_runtime(workers: usize) -> (tokio::runtime::Runtime, i64) {
    let rt = runtime_builder(Some(workers)).build().unwrap();
    env().guard.lock().unwrap().watch_runtime(rt.handle());
    let id = rt.handle().id().to_string().parse().unwrap();
    (rt, id)
}

fn dumps_of(runtime: i64) -> Vec<LogEntry> {
    env()
        .receiver
        .events("kms.taskdump")
        .into_iter()
        .filter(|e| e.int_attr("tokio.runtime.id") == Some(runtime))
        .collect()
}

fn request(method: &str) -> instrumented_kms::RequestInfo {
    instrumented_kms::RequestInfo {
        rpc_method: method.into(),
        url_path: format!("/prpc/KMS.{method}"),
        http_method: "POST".into(),
        client_addr: None,
        protocol: HttpProtocol::Http2,
    }
}

/// The innermost app frame: waits for an answer that never comes (its sender
/// is kept alive, so the receiver is never woken).
#[inline(never)]
async fn wait_for_the_webhook_answer(answer: tokio::sync::oneshot::Receiver<()>) {
    let _ = answer.await;
}

/// The handler, one frame further out.
#[inline(never)]
async fn handle_get_meta(answer: tokio::sync::oneshot::Receiver<()>) {
    wait_for_the_webhook_answer(answer).await;
}

#[test]
fn a_request_stuck_on_a_never_woken_future_shows_its_await_chain() {
    let env = env();
    let (rt, runtime) = watched_runtime(2);
    let (_never_sent, answer) = tokio::sync::oneshot::channel::<()>();
    let task = rt.spawn(
        async move { handle_get_meta(answer).await }
            .instrument(request_span(&request("TestNeverWoken"))),
    );
    let task_id: i64 = task.id().to_string().parse().unwrap();

    env.receiver
        .wait_until("a kms.taskdump of the stuck request", WAIT, |_| {
            dumps_of(runtime)
                .iter()
                .any(|e| e.int_attr("tokio.task.id") == Some(task_id))
        });
    let dump = dumps_of(runtime)
        .into_iter()
        .find(|e| e.int_attr("tokio.task.id") == Some(task_id))
        .unwrap();
    assert_eq!(dump.str_attr("taskdump.outcome").as_deref(), Some("ok"));
    assert_eq!(dump.record.severity_text, "INFO");
    let chain: Vec<String> =
        serde_json::from_str(&dump.str_attr("taskdump.chain").unwrap()).unwrap();
    let position = |name: &str| {
        chain
            .iter()
            .position(|frame| frame.contains(name))
            .unwrap_or_else(|| panic!("{name} not in the chain {chain:?}"))
    };
    // Outermost first: the handler, then what it awaits, then the leaf.
    assert!(position("handle_get_meta") < position("wait_for_the_webhook_answer"));
    assert!(
        chain.last().unwrap().contains("oneshot"),
        "the leaf names what it waits on: {chain:?}"
    );
    assert!(
        chain.iter().all(|f| !f.starts_with("tokio::runtime")
            && !f.starts_with("tracing::")
            && !f.starts_with("instrumented_kms::")),
        "machinery frames are trimmed: {chain:?}"
    );
    assert!(dump.int_attr("taskdump.tasks").unwrap() >= 1);

    // The record carries the request span's ids.
    let snapshot = env
        .receiver
        .wait_for_span("the request's snapshot", WAIT, |s| {
            s.span.name == "kms.request"
                && s.str_attr("rpc.method").as_deref() == Some("TestNeverWoken")
        });
    assert_eq!(dump.record.trace_id, snapshot.span.trace_id);
    assert_eq!(dump.record.span_id, snapshot.span.span_id);

    task.abort();
    drop(rt);
}

/// Opens on drop (also when an assertion unwinds), so the blocked worker is
/// released and the runtime can shut down.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    fn wait(&self) {
        let (open, cv) = &*self.0;
        let mut open = open.lock().unwrap();
        while !*open {
            open = cv.wait(open).unwrap();
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if Arc::strong_count(&self.0) == 2 {
            *self.0 .0.lock().unwrap() = true;
            self.0 .1.notify_all();
        }
    }
}

#[test]
fn a_runtime_whose_worker_is_blocked_times_the_dump_out() {
    let env = env();
    let (rt, runtime) = watched_runtime(1);
    let gate = Gate::default();
    let (_never_sent, answer) = tokio::sync::oneshot::channel::<()>();
    let stuck = rt.spawn(
        async move { handle_get_meta(answer).await }
            .instrument(request_span(&request("TestBlockedWorker"))),
    );
    // Once the request is stuck, the only worker blocks.
    let blocker = {
        let gate = gate.clone();
        rt.spawn(async move {
            tokio::time::sleep(THRESHOLD).await;
            gate.wait();
        })
    };

    env.receiver
        .wait_until("a timed-out kms.taskdump", WAIT, |_| {
            dumps_of(runtime)
                .iter()
                .any(|e| e.str_attr("taskdump.outcome").as_deref() == Some("timeout"))
        });
    let dump = dumps_of(runtime)
        .into_iter()
        .find(|e| e.str_attr("taskdump.outcome").as_deref() == Some("timeout"))
        .unwrap();
    assert_eq!(
        dump.int_attr("taskdump.timeout_ms"),
        Some(DUMP_TIMEOUT.as_millis() as i64)
    );
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let waited = dump
        .record
        .attributes
        .iter()
        .find(|kv| kv.key == "taskdump.duration_ms")
        .and_then(|kv| kv.value.as_ref()?.value.clone());
    assert!(
        matches!(waited, Some(Value::DoubleValue(ms)) if ms >= DUMP_TIMEOUT.as_millis() as f64),
        "{waited:?}"
    );

    drop(gate);
    rt.block_on(blocker).unwrap();
    stuck.abort();
}

/// Shuts the runtime down without waiting for its workers, also when an
/// assertion unwinds: a runtime a dump froze would never shut down.
struct Background(Option<tokio::runtime::Runtime>);

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

fn outcome(e: &LogEntry) -> Option<String> {
    e.str_attr("taskdump.outcome")
}

#[test]
fn a_runtime_flooded_with_runnable_tasks_is_dumped_only_once_it_quiets() {
    let env = env();
    let (rt, runtime) = watched_runtime(2);
    let rt = Background(Some(rt));
    let handle = rt.0.as_ref().unwrap().handle().clone();
    let (_never_sent, answer) = tokio::sync::oneshot::channel::<()>();
    let task = handle.spawn(
        async move { handle_get_meta(answer).await }
            .instrument(request_span(&request("TestFlooded"))),
    );
    let task_id: i64 = task.id().to_string().parse().unwrap();
    // 500 always-ready tasks, 2 ms of CPU per poll: the local run queues
    // hold far more than the 128 tasks a tokio dump can move, and each
    // task waits about half a second for its turn.
    let flooding = Arc::new(AtomicBool::new(true));
    for _ in 0..500 {
        let flooding = Arc::clone(&flooding);
        handle.spawn(async move {
            support::spin_in_short_polls(Duration::from_millis(2), || {
                flooding.load(Ordering::Relaxed)
            })
            .await;
        });
    }

    env.receiver
        .wait_until("a skipped kms.taskdump", WAIT, |_| {
            dumps_of(runtime)
                .iter()
                .any(|e| outcome(e).as_deref() == Some("skipped"))
        });
    let skipped = dumps_of(runtime)
        .into_iter()
        .find(|e| outcome(e).as_deref() == Some("skipped"))
        .unwrap();
    assert!(skipped.int_attr("taskdump.alive_tasks").unwrap() > 128);
    assert!(
        skipped.int_attr("taskdump.local_queue_depth").unwrap() > 64
            || skipped.int_attr("heartbeat.lag_ms").unwrap_or(0) >= 250,
        "{:?}",
        skipped.record.body
    );
    // Nothing was asked of the flooded runtime: a dump there would have
    // frozen it, and the flood could never be stopped.
    assert!(
        dumps_of(runtime)
            .iter()
            .all(|e| outcome(e).as_deref() == Some("skipped")),
        "a dump was requested of the flooded runtime"
    );

    flooding.store(false, Ordering::Relaxed);
    env.receiver.wait_until(
        "the stuck request's dump once the flood ended",
        WAIT,
        |_| {
            dumps_of(runtime)
                .iter()
                .any(|e| e.int_attr("tokio.task.id") == Some(task_id))
        },
    );
    let skips = dumps_of(runtime)
        .iter()
        .filter(|e| outcome(e).as_deref() == Some("skipped"))
        .count();
    assert_eq!(skips, 1, "one record per stretch of skipped dumps");
    task.abort();
}
