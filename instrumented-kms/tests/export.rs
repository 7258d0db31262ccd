//! OTLP export end to end: spans and open-span snapshots reach a real
//! in-process OTLP receiver; export survives a wedged app runtime; an absent
//! or black-holed collector costs the app nothing but counted drops.
#![cfg(feature = "otlp")]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use instrumented_kms::{
    outbound, record_status, request_span, Builder, DiagEvent, DiagGuard, HttpProtocol,
    OutboundCall, Peer, RequestInfo, Severity,
};
use support::{str_attr, BlackHole, Receiver};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

const WAIT: Duration = Duration::from_secs(10);

/// A builder for tests: export to `endpoint`, no console, no log output,
/// quick open-span reports.
fn builder(endpoint: &str) -> Builder {
    Builder::default()
        .service_name("test-kms")
        .service_version("9.9.9")
        .otlp_endpoint(endpoint)
        .console_enabled(false)
        .log_enabled(false)
        .open_span_threshold(Duration::from_millis(200))
        .open_span_interval(Duration::from_millis(100))
}

/// Builds the layer and installs it as this thread's default subscriber.
fn start(builder: Builder) -> (DiagGuard, tracing::subscriber::DefaultGuard) {
    let (layer, guard) = builder.build().expect("build diagnostics");
    let subscriber = tracing_subscriber::registry().with(layer);
    let default = tracing::subscriber::set_default(subscriber);
    (guard, default)
}

fn request_info() -> RequestInfo {
    RequestInfo {
        rpc_method: "GetMeta".into(),
        url_path: "/prpc/KMS.GetMeta".into(),
        http_method: "POST".into(),
        client_addr: Some("10.0.2.15:40000".parse().unwrap()),
        protocol: HttpProtocol::Http11,
    }
}

#[test]
fn request_and_outbound_spans_reach_the_receiver() {
    let receiver = Receiver::start();
    let (_guard, _default) = start(builder(&receiver.endpoint()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let span = request_span(&request_info());
        async {
            let call = OutboundCall::new(Peer::AuthWebhook, "get_info")
                .http("GET", "http://10.0.2.2:8000/");
            outbound(call, tokio::task::yield_now()).await;
        }
        .instrument(span.clone())
        .await;
        record_status(&span, 200);
    });

    let request = receiver.wait_for_span_named("kms.request", WAIT);
    let outbound = receiver.wait_for_span_named("kms.outbound", WAIT);
    assert_eq!(request.scope, "instrumented-kms");
    assert_eq!(request.span.kind, 2, "kms.request is SERVER");
    assert_eq!(outbound.span.kind, 3, "kms.outbound is CLIENT");
    assert_eq!(request.str_attr("rpc.method").as_deref(), Some("GetMeta"));
    assert_eq!(request.str_attr("rpc.system").as_deref(), Some("prpc"));
    assert_eq!(
        request.str_attr("client.address").as_deref(),
        Some("10.0.2.15")
    );
    assert_eq!(request.int_attr("client.port"), Some(40000));
    assert_eq!(
        request.str_attr("network.protocol.version").as_deref(),
        Some("1.1")
    );
    assert_eq!(request.int_attr("http.response.status_code"), Some(200));
    assert_eq!(
        outbound.str_attr("kms.peer").as_deref(),
        Some("auth_webhook")
    );
    assert_eq!(
        outbound.str_attr("server.address").as_deref(),
        Some("10.0.2.2")
    );
    assert_eq!(outbound.int_attr("server.port"), Some(8000));
    assert_eq!(outbound.span.trace_id, request.span.trace_id);
    assert_eq!(outbound.span.parent_span_id, request.span.span_id);
    assert_eq!(request.span.trace_id.len(), 16);
    assert_eq!(request.span.span_id.len(), 8);
    assert!(request.span.end_time_unix_nano >= request.span.start_time_unix_nano);

    assert_eq!(
        str_attr(&request.resource, "service.name").as_deref(),
        Some("test-kms")
    );
    assert_eq!(
        str_attr(&request.resource, "service.version").as_deref(),
        Some("9.9.9")
    );
    assert!(str_attr(&request.resource, "host.name").is_some());
    assert_eq!(
        support::int_attr(&request.resource, "process.pid"),
        Some(i64::from(std::process::id()))
    );
}

#[test]
fn an_open_span_is_reported_before_it_closes_then_superseded() {
    let receiver = Receiver::start();
    let (_guard, _default) = start(builder(&receiver.endpoint()));
    let span = tracing::info_span!("stuck.handler", rpc.method = "GetMeta");

    let snapshot = receiver.wait_for_span("a snapshot of stuck.handler", WAIT, |s| {
        s.span.name == "stuck.handler" && s.is_snapshot()
    });
    assert_eq!(snapshot.scope, "instrumented-kms.open-spans");
    assert!(snapshot.int_attr("kms.open.snapshot_seq").unwrap() >= 1);
    assert!(snapshot.int_attr("kms.open.age_ms").unwrap() >= 200);
    assert_eq!(snapshot.str_attr("rpc.method").as_deref(), Some("GetMeta"));
    assert_eq!(snapshot.span.status.as_ref().map(|s| s.code), Some(0));
    assert!(
        !receiver
            .spans()
            .iter()
            .any(|s| s.span.name == "stuck.handler" && !s.is_snapshot()),
        "the span is still open: only snapshots may have arrived"
    );
    // Refreshed while it stays open.
    receiver.wait_for_span("a second snapshot", WAIT, |s| {
        s.span.span_id == snapshot.span.span_id && s.int_attr("kms.open.snapshot_seq") >= Some(2)
    });

    drop(span);
    let closed = receiver.wait_for_span_named("stuck.handler", WAIT);
    assert_eq!(closed.span.span_id, snapshot.span.span_id);
    assert_eq!(closed.span.trace_id, snapshot.span.trace_id);
    assert_eq!(
        closed.span.start_time_unix_nano,
        snapshot.span.start_time_unix_nano
    );
    assert_eq!(closed.scope, "instrumented-kms");
    assert_eq!(closed.bool_attr("incomplete"), None);
}

#[test]
fn a_young_call_inside_a_stuck_request_is_reported_with_it() {
    // A request open past the threshold that has just entered a call: the
    // call is where it waits, so it is reported at once, not a threshold later.
    let threshold = Duration::from_secs(3);
    let receiver = Receiver::start();
    let (_guard, _default) = start(builder(&receiver.endpoint()).open_span_threshold(threshold));
    let request = tracing::info_span!("stuck.request", rpc.method = "GetMeta");
    let root = receiver.wait_for_span("a snapshot of stuck.request", WAIT, |s| {
        s.span.name == "stuck.request" && s.is_snapshot()
    });
    let call = request.in_scope(|| tracing::info_span!("young.call"));
    let child = receiver.wait_for_span("a snapshot of young.call", WAIT, |s| {
        s.span.name == "young.call" && s.is_snapshot()
    });
    assert_eq!(child.span.trace_id, root.span.trace_id);
    assert_eq!(child.span.parent_span_id, root.span.span_id);
    let age = child.int_attr("kms.open.age_ms").unwrap_or(i64::MAX);
    assert!(
        age < threshold.as_millis() as i64,
        "young.call was reported only at {age} ms, past the threshold on its own"
    );
    drop((call, request));
}

#[test]
fn export_survives_a_wedged_runtime() {
    let receiver = Receiver::start();
    let (guard, _default) = start(builder(&receiver.endpoint()));
    let rt = instrumented_kms::runtime_builder(Some(2)).build().unwrap();
    guard.watch_runtime(rt.handle());

    // Block every worker in std::thread::sleep until released.
    let release = Arc::new(AtomicBool::new(false));
    let all_blocked = Arc::new(Barrier::new(3));
    for _ in 0..2 {
        let release = release.clone();
        let all_blocked = all_blocked.clone();
        rt.spawn(async move {
            all_blocked.wait();
            while !release.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
    }
    all_blocked.wait();

    guard.sink().emit(
        DiagEvent::new(
            "kms.test_wedged",
            Severity::Error,
            "Both workers are blocked.",
        )
        .attr("runtime.workers", 2u64),
    );
    let event = receiver.wait_for_event("kms.test_wedged", WAIT);
    assert_eq!(event.scope, "instrumented-kms.diag");
    assert_eq!(event.record.severity_text, "ERROR");
    assert_eq!(event.int_attr("runtime.workers"), Some(2));
    assert_eq!(event.body(), "Both workers are blocked.");

    release.store(true, Ordering::Relaxed);
    drop(rt);
}

#[test]
fn diagnostic_threads_are_named_and_shutdown_flushes() {
    let receiver = Receiver::start();
    let (guard, _default) = start(builder(&receiver.endpoint()));
    let names = thread_names();
    // The kernel keeps 15 bytes of a thread name.
    for name in ["kms-diag-export", "kms-diag-open-spans"] {
        assert!(
            names.iter().any(|n| n == &name[..15]),
            "{name} not in {names:?}"
        );
    }

    for i in 0..100 {
        let _span = tracing::info_span!("flushed", i).entered();
    }
    // Shutdown must deliver what is queued, within its bound.
    let started = Instant::now();
    assert!(guard.shutdown(Duration::from_secs(5)));
    assert!(started.elapsed() < Duration::from_secs(5));
    let flushed = receiver
        .spans()
        .iter()
        .filter(|s| s.span.name == "flushed")
        .count();
    assert_eq!(flushed, 100);
}

/// Names of this process's OS threads (`comm`, 15 bytes at most).
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_owned())
        .collect()
}

/// Emits `n` closed spans named `name` from a task on a current-thread
/// runtime (standing in for the app serving requests) and returns how long
/// that took.
fn serve_spans(name: &'static str, n: usize) -> Duration {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    rt.block_on(async {
        for i in 0..n {
            async {
                if i % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            .instrument(tracing::info_span!("request", otel.name = name))
            .await;
        }
    });
    started.elapsed()
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[test]
fn collector_absent_then_back_drops_are_counted_and_reported() {
    const SPANS: usize = 2_000;
    let addr = support::unused_addr();
    let (guard, _default) = start(
        builder(&format!("http://{addr}"))
            .trace_rate_limit(0)
            .export_queue_capacity(100)
            .export_timeout(Duration::from_millis(500)),
    );
    let took = serve_spans("absent.request", SPANS);
    assert!(took < Duration::from_secs(5), "serving took {took:?}");
    let stats = guard.export_stats().unwrap();
    assert!(stats.queued <= stats.ordinary_capacity + stats.priority_capacity);
    assert!(stats.dropped_spans >= (SPANS - 100) as u64, "{stats:?}");

    // The collector comes back on the same address.
    let receiver = Receiver::start_on(addr);
    receiver.wait_until("every span delivered or counted as dropped", WAIT, |r| {
        let delivered = r
            .spans()
            .iter()
            .filter(|s| s.span.name == "absent.request")
            .count() as i64;
        let reported = r
            .events("kms.export_drops")
            .last()
            .and_then(|e| e.int_attr("export.dropped_spans_total"))
            .unwrap_or(0);
        delivered + reported == SPANS as i64
    });
    let report = receiver.events("kms.export_drops").pop().unwrap();
    assert_eq!(report.record.severity_text, "WARN");
    assert!(report.int_attr("export.dropped_spans").unwrap() > 0);
    assert_eq!(
        report.int_attr("export.dropped_spans_total"),
        Some(guard.export_stats().unwrap().dropped_spans as i64)
    );
}

#[test]
fn black_holed_collector_keeps_the_app_serving_with_bounded_memory() {
    const SPANS: usize = 100_000;
    let hole = BlackHole::start();
    let (guard, _default) = start(
        builder(&hole.endpoint())
            .trace_rate_limit(0)
            .export_queue_capacity(256)
            .export_timeout(Duration::from_millis(300)),
    );
    let rss_before = rss_bytes();
    let took = serve_spans("blackholed.request", SPANS);
    let rss_after = rss_bytes();
    assert!(took < Duration::from_secs(20), "serving took {took:?}");
    let stats = guard.export_stats().unwrap();
    assert!(
        stats.queued <= stats.ordinary_capacity + stats.priority_capacity,
        "{stats:?}"
    );
    assert_eq!(stats.exported_spans, 0);
    // Every span is still queued, in the batch being sent, or counted as dropped.
    assert!(
        stats.dropped_spans + (stats.queued + stats.in_flight) as u64 >= SPANS as u64,
        "{stats:?}"
    );
    // Unbounded buffering of 100k spans would take well over 40 MB.
    let grown = rss_after.saturating_sub(rss_before);
    assert!(grown < 40 << 20, "RSS grew by {grown} bytes");
    // Shutdown against a black hole is bounded too.
    let started = Instant::now();
    guard.shutdown(Duration::from_millis(500));
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn rate_limited_traces_never_cost_slow_failed_or_stuck_spans() {
    let receiver = Receiver::start();
    let (guard, _default) = start(builder(&receiver.endpoint()).trace_rate_limit(5));
    for i in 0..200 {
        let _span = tracing::info_span!("fast", i).entered();
    }
    {
        let _failed = tracing::info_span!("failed").entered();
        tracing::error!("Something broke.");
    }
    let stuck = tracing::info_span!("stuck");
    receiver.wait_for_span("a snapshot of stuck", WAIT, |s| {
        s.span.name == "stuck" && s.is_snapshot()
    });
    drop(stuck);

    let failed = receiver.wait_for_span_named("failed", WAIT);
    assert_eq!(failed.span.status.as_ref().map(|s| s.code), Some(2));
    receiver.wait_for_span_named("stuck", WAIT);
    let fast = receiver
        .spans()
        .iter()
        .filter(|s| s.span.name == "fast")
        .count() as u64;
    // Five per second; a second boundary during the loop may allow five more.
    assert!((1..=10).contains(&fast), "{fast} fast spans exported");
    let stats = guard.export_stats().unwrap();
    assert_eq!(stats.sampled_out_spans + fast, 200);
    assert_eq!(stats.dropped_spans, 0);
}
