//! Runtime diagnostics end to end: the stall watchdog, runtime and task
//! metrics, and process facts, each seen at a real in-process OTLP receiver
//! through the library's own exporter.
//!
//! One diagnostics setup (global subscriber, one guard) serves every test in
//! this file; each test builds its own runtime and picks out its own events
//! by `tokio.runtime.id`, so the tests can run in parallel.
#![cfg(all(
    feature = "otlp",
    feature = "watchdog",
    feature = "runtime-metrics",
    feature = "process-facts"
))]

mod support;

use std::net::{TcpListener, TcpStream};
use std::sync::{mpsc, Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use instrumented_kms::{monitor_rpc, runtime_builder, Builder, DiagGuard};
use support::{LogEntry, Receiver};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

const POLL_THRESHOLD: Duration = Duration::from_millis(300);
const HEARTBEAT_THRESHOLD: Duration = Duration::from_millis(600);
const METRICS_INTERVAL: Duration = Duration::from_millis(200);
const PROCESS_INTERVAL: Duration = Duration::from_millis(200);
const WAIT: Duration = Duration::from_secs(10);
/// Target of the app's spans. (Not this file's module path: the library does
/// not track targets starting with `runtime`, tokio's own span target.)
const APP: &str = "kms_app";

struct Env {
    receiver: Receiver,
    /// `DiagGuard` is not `Sync`; the tests only call `watch_runtime`.
    guard: Mutex<DiagGuard>,
    /// The "RPC port" whose inbound connections process facts count.
    listener: TcpListener,
}

/// A memory budget no real machine reports, so the test sees it was used.
const MEMORY_LIMIT: u64 = 3 << 30 | 12345;

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let receiver = Receiver::start();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (layer, guard) = Builder::default()
            .service_name("test-kms")
            .otlp_endpoint(receiver.endpoint())
            .console_enabled(false)
            .log_enabled(false)
            .stall_poll_threshold(POLL_THRESHOLD)
            .stall_heartbeat_threshold(HEARTBEAT_THRESHOLD)
            .metrics_interval(METRICS_INTERVAL)
            .process_interval(PROCESS_INTERVAL)
            .listen_port(listener.local_addr().unwrap().port())
            .memory_limit(MEMORY_LIMIT)
            .build()
            .expect("build diagnostics");
        // Global: spans are entered on the runtime's worker threads.
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
            .expect("global subscriber");
        Env {
            receiver,
            guard: Mutex::new(guard),
            listener,
        }
    })
}

/// A watched application runtime and its id as exported.
fn watched_runtime(workers: usize) -> (tokio::runtime::Runtime, i64) {
    let rt = runtime_builder(Some(workers)).build().unwrap();
    env().guard.lock().unwrap().watch_runtime(rt.handle());
    let id = rt.handle().id().to_string().parse().unwrap();
    (rt, id)
}

fn events_of(name: &str, runtime: i64) -> Vec<LogEntry> {
    env()
        .receiver
        .events(name)
        .into_iter()
        .filter(|e| e.int_attr("tokio.runtime.id") == Some(runtime))
        .collect()
}

/// A numeric attribute (double or int) of a record.
fn number(entry: &LogEntry, key: &str) -> f64 {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let value = entry
        .record
        .attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref());
    match value {
        Some(Value::DoubleValue(v)) => *v,
        Some(Value::IntValue(v)) => *v as f64,
        other => panic!("{key}: not a number: {other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_handler_blocking_its_worker_is_reported_with_its_span() {
    let env = env();
    let (rt, runtime) = watched_runtime(2);
    let (tid_tx, tid_rx) = mpsc::channel();
    let handler = rt.spawn(
        async move {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(i64::from(unsafe { libc::gettid() })).unwrap();
            // The fault under test: a blocking call inside async code.
            std::thread::sleep(POLL_THRESHOLD * 4);
        }
        .instrument(tracing::info_span!(target: APP, "blocking_handler", rpc.method = "GetMeta")),
    );
    let tid = tid_rx.recv().unwrap();

    let stall = env.receiver.wait_for_log("a poll stall", WAIT, |e| {
        e.name() == "kms.stall"
            && e.int_attr("tokio.runtime.id") == Some(runtime)
            && e.str_attr("stall.kind").as_deref() == Some("poll")
    });
    assert_eq!(
        stall.str_attr("span.name").as_deref(),
        Some("blocking_handler")
    );
    assert_eq!(stall.int_attr("thread.id"), Some(tid));
    let thread_name = stall.str_attr("thread.name").unwrap();
    assert!(thread_name.starts_with("kms-worker-"), "{thread_name}");
    let worker = stall.int_attr("tokio.worker").expect("worker index");
    assert!((0..2).contains(&worker));
    assert_eq!(stall.bool_attr("stall.ongoing"), Some(true));
    assert!(stall.int_attr("stall.duration_ms").unwrap() >= POLL_THRESHOLD.as_millis() as i64);
    assert_eq!(stall.int_attr("stall.threshold_ms"), Some(300));
    assert_eq!(stall.int_attr("runtime.workers"), Some(2));
    assert_eq!(stall.int_attr("runtime.workers_stuck"), Some(1));
    assert!(stall.int_attr("tokio.task.id").is_some());
    // Sleeping in nanosleep: the kernel says S.
    assert_eq!(stall.str_attr("os.thread.state").as_deref(), Some("S"));
    assert_eq!(stall.record.severity_text, "ERROR");
    // The record carries the span's ids, so the collector can join it to the trace.
    assert_eq!(
        stall.str_attr("span.trace_id"),
        Some(hex(&stall.record.trace_id))
    );
    assert_eq!(
        stall.str_attr("span.span_id"),
        Some(hex(&stall.record.span_id))
    );
    assert!(
        stall.body().contains("blocking_handler"),
        "{}",
        stall.body()
    );

    rt.block_on(handler).unwrap();
    let end = env
        .receiver
        .wait_for_log("the poll stall's end", WAIT, |e| {
            e.name() == "kms.stall_end"
                && e.int_attr("tokio.runtime.id") == Some(runtime)
                && e.int_attr("thread.id") == Some(tid)
        });
    assert_eq!(end.bool_attr("stall.ongoing"), Some(false));
    assert_eq!(
        end.str_attr("span.name").as_deref(),
        Some("blocking_handler")
    );
    let total = end.int_attr("stall.duration_ms").unwrap();
    // Slept 1200 ms; timed from the watchdog's first sight of the poll
    // (within one check, 30 ms) to the check after it ended.
    assert!((900..=3000).contains(&total), "total {total} ms");
}

#[test]
fn with_every_worker_blocked_the_stall_still_reaches_the_receiver() {
    let env = env();
    let (rt, runtime) = watched_runtime(2);
    let workers = 2;
    let entered = Arc::new(Barrier::new(workers + 1));
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Arc::new(Mutex::new(release_rx));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let entered = Arc::clone(&entered);
        let release_rx = Arc::clone(&release_rx);
        tasks.push(rt.spawn(async move {
            entered.wait();
            // Blocks this worker until the test has seen the reports.
            let _ = release_rx.lock().unwrap().recv();
        }));
    }
    entered.wait();

    // Both poll stalls and the heartbeat stall arrive while everything is wedged.
    env.receiver.wait_until(
        "poll stalls on both workers and a heartbeat stall",
        WAIT,
        |_| {
            let stalls = events_of("kms.stall", runtime);
            let threads: std::collections::HashSet<i64> = stalls
                .iter()
                .filter(|e| e.str_attr("stall.kind").as_deref() == Some("poll"))
                .filter_map(|e| e.int_attr("thread.id"))
                .collect();
            let heartbeat = stalls
                .iter()
                .any(|e| e.str_attr("stall.kind").as_deref() == Some("heartbeat"));
            threads.len() == workers && heartbeat
        },
    );
    let heartbeat = events_of("kms.stall", runtime)
        .into_iter()
        .find(|e| e.str_attr("stall.kind").as_deref() == Some("heartbeat"))
        .unwrap();
    assert!(heartbeat.int_attr("heartbeat.lag_ms").unwrap() >= 600);
    assert_eq!(heartbeat.int_attr("runtime.workers_stuck"), Some(2));
    // The workers sleep in recv(): little CPU over the stall's window (the
    // collector calls workers busy from half the window on).
    let window = heartbeat.int_attr("runtime.workers_cpu_window_ms").unwrap();
    let cpu = heartbeat.int_attr("runtime.workers_cpu_ms").unwrap();
    assert!(window >= 600, "window {window} ms");
    assert!(
        cpu * 4 < window,
        "blocked workers on a CPU {cpu} ms of {window} ms"
    );

    drop(release_tx);
    for task in tasks {
        rt.block_on(task).unwrap();
    }
    env.receiver
        .wait_until("stall ends for both polls and the heartbeat", WAIT, |_| {
            let ends = events_of("kms.stall_end", runtime);
            ends.iter()
                .filter(|e| e.str_attr("stall.kind").as_deref() == Some("poll"))
                .count()
                == workers
                && ends
                    .iter()
                    .any(|e| e.str_attr("stall.kind").as_deref() == Some("heartbeat"))
        });
}

#[test]
fn a_heartbeat_starved_by_busy_tasks_carries_the_workers_cpu_time() {
    let env = env();
    let workers = 2;
    let (rt, runtime) = watched_runtime(workers);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Always-ready tasks with short polls: no poll stall, but each round of
    // them takes about 1.5 s of the two workers, and the heartbeat waits in
    // the run queue behind them.
    let spin = Duration::from_millis(10);
    let tasks: Vec<_> = (0..300)
        .map(|_| {
            let stop = Arc::clone(&stop);
            rt.spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let until = Instant::now() + spin;
                    while Instant::now() < until {
                        std::hint::spin_loop();
                    }
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let is_heartbeat = |e: &LogEntry| e.str_attr("stall.kind").as_deref() == Some("heartbeat");
    env.receiver
        .wait_until("a heartbeat stall under busy tasks", WAIT, |_| {
            events_of("kms.stall", runtime).iter().any(is_heartbeat)
        });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in tasks {
        rt.block_on(task).unwrap();
    }
    env.receiver
        .wait_until("the heartbeat stall ends", WAIT, |_| {
            events_of("kms.stall_end", runtime).iter().any(is_heartbeat)
        });
    let end = events_of("kms.stall_end", runtime)
        .into_iter()
        .find(|e| is_heartbeat(e))
        .unwrap();
    assert_eq!(end.int_attr("runtime.workers_stuck"), Some(0));
    let window = end.int_attr("runtime.workers_cpu_window_ms").unwrap();
    let cpu = end.int_attr("runtime.workers_cpu_ms").unwrap();
    // At least one worker wanted the CPU for most of the window (tasks that
    // yield stay in their worker's own list, so the other may sleep). On a
    // loaded machine it may wait for a CPU instead of running on one.
    let wait = end.int_attr("runtime.workers_cpu_wait_ms").unwrap_or(0);
    assert!(
        (cpu + wait) * 4 >= window * 3,
        "busy workers on a CPU {cpu} ms, waiting {wait} ms, of {window} ms"
    );
}

#[test]
fn a_healthy_busy_runtime_raises_no_stall() {
    let env = env();
    let (rt, runtime) = watched_runtime(2);
    let started = Instant::now();
    let run_for = HEARTBEAT_THRESHOLD * 3;
    rt.block_on(async {
        let mut tasks = Vec::new();
        // Busy but within capacity (about half a core of a 2-core box):
        // an overloaded runtime lagging its heartbeat would be a true alarm.
        for i in 0..500u64 {
            tasks.push(tokio::spawn(
                async move {
                    let mut round = 0u64;
                    while started.elapsed() < run_for {
                        round += 1;
                        // A little CPU, a yield, a short wait standing in for I/O.
                        let mut x = i ^ round;
                        for _ in 0..200 {
                            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                        }
                        std::hint::black_box(x);
                        tokio::task::yield_now().await;
                        tokio::time::sleep(Duration::from_millis(1 + (i + round) % 5)).await;
                    }
                }
                .instrument(tracing::info_span!(target: APP, "busy")),
            ));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let busy_for = started.elapsed();

    // Positive control: the watchdog is watching this runtime, so one real
    // stall on it is reported...
    rt.block_on(async {
        tokio::spawn(async { std::thread::sleep(POLL_THRESHOLD * 2) })
            .await
            .unwrap();
    });
    env.receiver.wait_until("the control stall", WAIT, |_| {
        !events_of("kms.stall_end", runtime).is_empty()
    });
    // ... and it is the only one: nothing during the busy run.
    let stalls = events_of("kms.stall", runtime);
    assert!(
        stalls.iter().all(|e| e.str_attr("span.name").is_none()
            && e.str_attr("stall.kind").as_deref() == Some("poll")),
        "false alarm during a healthy busy run ({busy_for:?}): {:#?}",
        stalls.iter().map(LogEntry::body).collect::<Vec<_>>()
    );
}

#[test]
fn runtime_and_task_metrics_are_sampled_with_sane_values() {
    let env = env();
    let (rt, runtime) = watched_runtime(2);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    // One handler that never finishes: it must stay "in flight" in every
    // later sample, not only in the interval it started in.
    let stuck = rt.spawn(monitor_rpc("TestStuckRpc", std::future::pending::<()>()));
    // Steady RPC-like traffic through a per-method task monitor.
    let load = rt.spawn(async move {
        let mut handled = 0u64;
        while !*stop_rx.borrow_and_update() {
            let calls: Vec<_> = (0..10)
                .map(|_| {
                    tokio::spawn(monitor_rpc("TestMetricsRpc", async {
                        tokio::task::yield_now().await;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }))
                })
                .collect();
            for c in calls {
                c.await.unwrap();
            }
            handled += 10;
            tokio::select! {
                _ = stop_rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
        handled
    });

    env.receiver
        .wait_until("a kms.runtime sample with polls", WAIT, |_| {
            events_of("kms.runtime", runtime)
                .iter()
                .any(|e| e.int_attr("runtime.total_polls").unwrap_or(0) > 0)
        });
    let sample = events_of("kms.runtime", runtime)
        .into_iter()
        .find(|e| e.int_attr("runtime.total_polls").unwrap_or(0) > 0)
        .unwrap();
    assert_eq!(sample.int_attr("runtime.workers"), Some(2));
    assert!(sample.int_attr("runtime.alive_tasks").unwrap() >= 1);
    let busy = number(&sample, "runtime.busy_ratio");
    assert!((0.0..=1.05).contains(&busy), "busy ratio {busy}");
    assert!(number(&sample, "runtime.mean_poll_us") >= 0.0);
    assert!(number(&sample, "runtime.max_busy_worker_ms") >= 0.0);
    assert!(sample.int_attr("runtime.global_queue_depth").is_some());
    assert!(sample.int_attr("runtime.blocking_threads").is_some());
    assert_eq!(sample.bool_attr("heartbeat.ok"), Some(true));
    // The workers' CPU accounting over the interval (the first sample after
    // the runtime registers may lack it; this one has polls, so a later one).
    let window = sample.int_attr("runtime.workers_cpu_window_ms");
    let cpu = sample.int_attr("runtime.workers_cpu_ms");
    if let (Some(window), Some(cpu)) = (window, cpu) {
        assert!(
            window > 0 && (0..=window * 2 + 50).contains(&cpu),
            "cpu {cpu} of {window}"
        );
    }
    assert!(
        events_of("kms.runtime", runtime)
            .iter()
            .any(|e| e.int_attr("runtime.workers_cpu_window_ms").is_some()),
        "no kms.runtime sample carries the workers' CPU accounting"
    );
    let lag = sample.int_attr("heartbeat.lag_ms").unwrap();
    assert!(
        (0..HEARTBEAT_THRESHOLD.as_millis() as i64).contains(&lag),
        "lag {lag}"
    );
    assert_eq!(sample.record.severity_text, "INFO");

    let task = env
        .receiver
        .wait_for_log("kms.task_metrics for the RPC", WAIT, |e| {
            e.name() == "kms.task_metrics"
                && e.str_attr("rpc.method").as_deref() == Some("TestMetricsRpc")
                && e.int_attr("task.polls").unwrap_or(0) > 0
        });
    let instrumented = task.int_attr("task.instrumented").unwrap();
    let dropped = task.int_attr("task.dropped").unwrap();
    assert!(instrumented >= 10 && dropped <= instrumented);
    assert_eq!(
        task.int_attr("task.in_flight"),
        Some(instrumented - dropped)
    );
    assert!(task.int_attr("task.slow_polls").unwrap() <= task.int_attr("task.polls").unwrap());
    let mean_poll_us = number(&task, "task.mean_poll_us");
    assert!(
        mean_poll_us > 0.0 && mean_poll_us < 100_000.0,
        "{mean_poll_us}"
    );
    // Each call idles in a 2 ms sleep.
    let idle_ms = number(&task, "task.mean_idle_ms");
    assert!(idle_ms >= 1.0, "mean idle {idle_ms} ms");

    // A later interval of the stuck handler (no polls in it) still counts it.
    let later =
        env.receiver
            .wait_for_log("a later kms.task_metrics for the stuck RPC", WAIT, |e| {
                e.name() == "kms.task_metrics"
                    && e.str_attr("rpc.method").as_deref() == Some("TestStuckRpc")
                    && e.int_attr("task.polls") == Some(0)
            });
    assert_eq!(later.int_attr("task.instrumented"), Some(1));
    assert_eq!(later.int_attr("task.in_flight"), Some(1));
    stuck.abort();

    stop_tx.send(true).unwrap();
    assert!(rt.block_on(load).unwrap() >= 10);
}

#[test]
fn process_facts_count_close_wait_on_the_listen_port_and_fds_against_the_limit() {
    let env = env();
    let port = i64::from(env.listener.local_addr().unwrap().port());
    let addr = env.listener.local_addr().unwrap();

    // One client that gives up: it closes, the server never reads or closes,
    // so the server side sits in CLOSE_WAIT (the reported hang's signature).
    let quitter = TcpStream::connect(addr).unwrap();
    let (_held_quitter, _) = env.listener.accept().unwrap();
    drop(quitter);
    // One client that stays.
    let stayer = TcpStream::connect(addr).unwrap();
    let (_held_stayer, _) = env.listener.accept().unwrap();
    let stayer_port = stayer.local_addr().unwrap().port();
    // Some extra descriptors, so the fd count has something to show.
    let extra: Vec<std::fs::File> = (0..64)
        .map(|_| std::fs::File::open("/dev/null").unwrap())
        .collect();
    let floor = std::fs::read_dir("/proc/self/fd").unwrap().count() as i64;

    let facts = env
        .receiver
        .wait_for_log("kms.process with the CLOSE_WAIT", WAIT, |e| {
            e.name() == "kms.process"
                && e.str_attr("tcp.inbound")
                    .and_then(|j| serde_json::from_str::<serde_json::Value>(&j).ok())
                    .is_some_and(|v| v["CLOSE_WAIT"] == 1 && v["ESTABLISHED"] == 1)
                && e.int_attr("process.open_fds").unwrap_or(0) >= floor - 8
        });
    assert_eq!(facts.int_attr("tcp.listen_port"), Some(port));
    assert_eq!(
        facts.int_attr("process.memory_limit_bytes"),
        Some(MEMORY_LIMIT as i64),
        "the configured budget, not the machine's"
    );
    let inbound: serde_json::Value =
        serde_json::from_str(&facts.str_attr("tcp.inbound").unwrap()).unwrap();
    assert_eq!(
        inbound.get("LISTEN"),
        None,
        "listening sockets are not connections"
    );
    // The staying client's side is an outbound connection to the listen port.
    let outbound: serde_json::Value =
        serde_json::from_str(&facts.str_attr("tcp.outbound").unwrap()).unwrap();
    assert!(
        outbound
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["peer"] == addr.to_string()
                && c["state"] == "ESTABLISHED"
                && c["count"] == 1),
        "outbound {outbound} (client port {stayer_port})"
    );
    let fds = facts.int_attr("process.open_fds").unwrap();
    let limit = facts.int_attr("process.fd_limit").unwrap();
    assert!(fds >= 64 && fds <= limit, "fds {fds} limit {limit}");
    let mut soft = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: writes into our struct.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut soft) },
        0
    );
    assert_eq!(limit as u64, soft.rlim_cur);
    let rss = facts.int_attr("process.rss_bytes").unwrap();
    let mem = facts.int_attr("process.memory_limit_bytes").unwrap();
    assert!(rss > 1 << 20 && rss < mem, "rss {rss} limit {mem}");
    assert!(facts.int_attr("process.threads").unwrap() >= 4);
    drop(extra);
}

/// Opens on drop (also when a failed assertion unwinds), so blocked jobs and
/// spinning tasks end and the runtime can shut down.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, std::sync::Condvar)>);

impl Gate {
    fn wait(&self) {
        let (open, cv) = &*self.0;
        let mut open = open.lock().unwrap();
        while !*open {
            open = cv.wait(open).unwrap();
        }
    }
    fn is_open(&self) -> bool {
        *self.0 .0.lock().unwrap()
    }
    fn open(&self) {
        *self.0 .0.lock().unwrap() = true;
        self.0 .1.notify_all();
    }
}

struct OpenOnDrop(Gate);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

#[test]
fn an_exhausted_blocking_pool_and_a_busy_worker_show_in_runtime_samples() {
    let env = env();
    let rt = runtime_builder(Some(2))
        .max_blocking_threads(2)
        .build()
        .unwrap();
    env.guard.lock().unwrap().watch_runtime_with(
        rt.handle(),
        instrumented_kms::RuntimeLimits::default().max_blocking_threads(2),
    );
    let runtime: i64 = rt.handle().id().to_string().parse().unwrap();
    let gate = Gate::default();
    let opener = OpenOnDrop(gate.clone());

    // Five blocking jobs that never return until the gate opens: two run,
    // three queue.
    let jobs: Vec<_> = (0..5)
        .map(|_| {
            let gate = gate.clone();
            rt.spawn_blocking(move || gate.wait())
        })
        .collect();
    // One task that keeps its worker busy with short polls.
    let spinner = {
        let gate = gate.clone();
        rt.spawn(async move {
            support::spin_in_short_polls(Duration::from_millis(2), || !gate.is_open()).await;
        })
    };

    env.receiver
        .wait_until("a kms.runtime sample of the full pool", WAIT, |_| {
            events_of("kms.runtime", runtime).iter().any(|e| {
                e.int_attr("runtime.blocking_queue_depth") == Some(3)
                    && e.int_attr("runtime.busy_workers").unwrap_or(0) >= 1
            })
        });
    let sample = events_of("kms.runtime", runtime)
        .into_iter()
        .find(|e| e.int_attr("runtime.blocking_queue_depth") == Some(3))
        .unwrap();
    assert_eq!(sample.int_attr("runtime.blocking_threads_max"), Some(2));
    assert_eq!(sample.int_attr("runtime.blocking_threads"), Some(2));
    assert_eq!(sample.int_attr("runtime.idle_blocking_threads"), Some(0));
    let depth = sample.int_attr("runtime.local_queue_depth").unwrap();
    let max_depth = sample.int_attr("runtime.max_local_queue_depth").unwrap();
    assert!(
        0 <= max_depth && max_depth <= depth,
        "{max_depth} of {depth}"
    );
    assert!(sample.int_attr("runtime.busy_workers").unwrap() <= 2);

    drop(opener);
    rt.block_on(async {
        spinner.await.unwrap();
        for job in jobs {
            job.await.unwrap();
        }
    });
}

#[test]
fn a_runtime_watched_without_limits_exports_no_blocking_maximum() {
    let env = env();
    let (_rt, runtime) = watched_runtime(1);
    env.receiver.wait_until("a kms.runtime sample", WAIT, |_| {
        !events_of("kms.runtime", runtime).is_empty()
    });
    let sample = events_of("kms.runtime", runtime).remove(0);
    assert_eq!(sample.int_attr("runtime.blocking_threads_max"), None);
    assert!(sample.int_attr("runtime.busy_workers").is_some());
    assert!(sample.int_attr("runtime.idle_blocking_threads").is_some());
}
