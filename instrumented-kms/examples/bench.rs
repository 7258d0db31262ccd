//! Overhead benchmark: a KMS-like HTTP service under load, with the
//! diagnostics off, with the stock stack, and with ours.
//!
//! ```text
//! cargo run --release -p instrumented-kms --example bench --features full
//! ```
//!
//! Prints figures; it is not a test and asserts nothing. Each cell runs the
//! service in a child process (so CPU time and peak RSS are the server's
//! alone, and each configuration gets a fresh global subscriber); this
//! process generates load on loopback and runs the OTLP receiver.
//!
//! Configurations (alternated, two rounds):
//! - `off`: no subscriber at all.
//! - `fmt-only`: what the upstream KMS pays today: a fmt layer with an `info`
//!   env filter (spans at `info` are recorded by the registry).
//! - `stock`: console-subscriber defaults, tracing-opentelemetry with the
//!   opentelemetry_sdk default batch exporter (OTLP/gRPC), tokio-metrics
//!   (RuntimeMonitor + a TaskMonitor), a parking_lot deadlock thread.
//! - `ours-no-console`: instrumented-kms, all parts but the console.
//! - `ours-all`: instrumented-kms, everything on.
//!
//! The summary gives each configuration's ratios both to `off` and to
//! `fmt-only` (the logging the KMS has anyway), at the same load.
//!
//! The handler: a request span, a per-RPC task monitor, a little CPU, a
//! yield, and an outbound-call span around a 1 ms sleep standing in for I/O.
//! A few `/stuck` requests stay open 2.5 s per cell, so open-span snapshots
//! (threshold 1 s, interval 0.5 s) must get through while ordinary spans may
//! be dropped.
//!
//! Diagnostic variants, to split the cost by part (only with
//! `BENCH_CONFIGS`): `off-hooks` (our runtime builder's poll hooks, no
//! subscriber), `ours-no-otlp` (no export, no open-span reporter),
//! `ours-nomon` (no per-RPC task monitor), `ours-console-timers` (everything,
//! the console recording timers too).
//!
//! Long console cell: `BENCH_LONG=1` adds, after the rounds, one
//! `BENCH_LONG_SECS` (default 60) cell each of `fmt-only` and `ours-all` at
//! 512 connections: the console's peak RSS and request rate once its
//! retention window (60 s) is full. Left out by default so a quick run stays
//! quick.
//!
//! Environment: `BENCH_SECS` (per cell, default 3), `BENCH_ROUNDS` (default
//! 2), `BENCH_CONFIGS` and `BENCH_LOADS` (comma-separated subsets),
//! `BENCH_LONG`, `BENCH_LONG_SECS`, `BENCH_PERF=DIR` (`perf record` samples
//! each server's CPU from READY to the end of its load into
//! `DIR/CONFIG-CONNS.perf`; `examples/cost_split.py` splits it by
//! part). The cells read the library's own
//! variables too: `KMS_DIAG_TASKDUMP=0` turns task dumps of the `/stuck`
//! requests off (at 512 connections a dump can leave a worker spinning in
//! tokio's dump for the rest of the cell).
//!
//! Task dumps (feature `taskdump`, part of `full`): after the table, the cost
//! of one `Handle::dump()` of a runtime with many idle request tasks (the
//! pause the dumper imposes, once per open-span interval while requests are
//! stuck), of symbolizing one stuck task's trace (on the dumper's thread), and
//! the latency a concurrent request sees during dumps. `BENCH_TASKDUMP_ONLY=1`
//! prints only that; `BENCH_NO_TASKDUMP=1` leaves it out.

#[path = "../tests/support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tracing::Instrument;

const CONFIGS: &[&str] = &["off", "fmt-only", "stock", "ours-no-console", "ours-all"];
const LOADS: &[usize] = &[16, 512];
const STUCK: usize = 4;
const STUCK_FOR: Duration = Duration::from_millis(2500);
const WARMUP: Duration = Duration::from_millis(500);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--cell") {
        server(&args[2], &args[3]);
        return;
    }
    parent();
}

// ---------------------------------------------------------------- server

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    Stock,
    Ours,
}

struct Server {
    mode: Mode,
    no_monitor: bool,
    served: AtomicU64,
    stock_monitor: tokio_metrics::TaskMonitor,
}

fn cpu_us() -> u64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Peak RSS of this process (`VmHWM`; `ru_maxrss` would carry the parent's
/// peak across fork+exec).
fn max_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn server(config: &str, endpoint: &str) {
    let (mode, rt) = match config {
        "off" | "fmt-only" => (Mode::Off, plain_runtime()),
        // Diagnostic variants, for finding where the cost is.
        "off-hooks" => (
            Mode::Off,
            instrumented_kms::runtime_builder(Some(2)).build().unwrap(),
        ),
        "stock" => (Mode::Stock, plain_runtime()),
        _ => (
            Mode::Ours,
            instrumented_kms::runtime_builder(Some(2)).build().unwrap(),
        ),
    };
    let mut ours_guard = None;
    let mut stock_provider = None;
    match config {
        "off" | "off-hooks" => {}
        "fmt-only" => {
            use tracing_subscriber::prelude::*;
            tracing_subscriber::registry()
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_filter(tracing_subscriber::EnvFilter::new("info")),
                )
                .init();
        }
        "ours-no-otlp" => {
            let guard = instrumented_kms::Builder::default()
                .log_filter("warn")
                .otlp_enabled(false)
                .console_enabled(false)
                .init()
                .unwrap();
            guard.watch_runtime(rt.handle());
            ours_guard = Some(guard);
        }
        "stock" => stock_provider = Some(install_stock(&rt, endpoint)),
        "ours-no-console" | "ours-all" | "ours-nomon" | "ours-console-timers" => {
            let guard = instrumented_kms::Builder::default()
                .service_name("bench")
                .otlp_endpoint(endpoint)
                .log_filter("warn")
                .console_enabled(config == "ours-all" || config == "ours-console-timers")
                .console_timers(config == "ours-console-timers")
                .metrics_interval(Duration::from_secs(5))
                .console_bind("127.0.0.1:0".parse().unwrap())
                .open_span_threshold(Duration::from_secs(1))
                .open_span_interval(Duration::from_millis(500))
                .init()
                .unwrap();
            guard.watch_runtime(rt.handle());
            ours_guard = Some(guard);
        }
        other => panic!("unknown config {other}"),
    }
    let state = Arc::new(Server {
        mode,
        no_monitor: config == "ours-nomon",
        served: AtomicU64::new(0),
        stock_monitor: tokio_metrics::TaskMonitor::new(),
    });
    if mode == Mode::Stock {
        let monitor = tokio_metrics::RuntimeMonitor::new(rt.handle());
        let task_monitor = state.stock_monitor.clone();
        rt.spawn(async move {
            let mut runtime = monitor.intervals();
            let mut tasks = task_monitor.intervals();
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let r = runtime.next();
                let t = tasks.next();
                tracing::debug!(?r, ?t, "metrics");
            }
        });
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_secs(10));
            let _ = parking_lot::deadlock::check_deadlock();
        });
    }

    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let s = state.clone();
    rt.spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let s = s.clone();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(
                        TokioIo::new(stream),
                        hyper::service::service_fn(move |req| handle(s.clone(), req, peer)),
                    )
                    .await;
            });
        }
    });
    let cpu_start = cpu_us();
    let served_start = state.served.load(Ordering::Relaxed);
    println!("READY {}", addr.port());
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    let cpu = cpu_us() - cpu_start;
    let served = state.served.load(Ordering::Relaxed) - served_start;
    let mut snapshots = 0;
    let mut dropped = 0;
    let mut sampled_out = 0;
    if let Some(guard) = ours_guard.take() {
        if let Some(stats) = guard.export_stats() {
            snapshots = stats.snapshots;
            dropped = stats.dropped_spans;
            sampled_out = stats.sampled_out_spans;
        }
        guard.shutdown(Duration::from_secs(5));
    }
    if let Some(provider) = stock_provider.take() {
        let _ =
            rt.block_on(async { tokio::task::spawn_blocking(move || provider.shutdown()).await });
    }
    println!(
        "STATS served={served} cpu_us={cpu} maxrss_kb={} snapshots={snapshots} dropped={dropped} sampled_out={sampled_out}",
        max_rss_kb()
    );
    std::io::stdout().flush().unwrap();
    std::process::exit(0);
}

fn plain_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn install_stock(
    rt: &tokio::runtime::Runtime,
    endpoint: &str,
) -> opentelemetry_sdk::trace::SdkTracerProvider {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig;
    use tracing_subscriber::prelude::*;

    let _enter = rt.enter();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .unwrap();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("bench")
                .build(),
        )
        .build();
    let tracer = provider.tracer("bench");
    let console = console_subscriber::ConsoleLayer::builder()
        .with_default_env()
        .server_addr("127.0.0.1:0".parse::<SocketAddr>().unwrap())
        .spawn();
    tracing_subscriber::registry()
        .with(console)
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_filter(tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    provider
}

fn cpu_work() -> u64 {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..2_000u64 {
        x = (x ^ i).wrapping_mul(0xBF58_476D_1CE4_E5B9).rotate_left(17);
    }
    std::hint::black_box(x)
}

async fn handle(
    s: Arc<Server>,
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let stuck = req.uri().path() == "/stuck";
    let method = if stuck { "Stuck" } else { "GetMeta" };
    let span = match s.mode {
        Mode::Stock => tracing::info_span!(
            "kms.request",
            otel.kind = "server",
            rpc.system = "prpc",
            rpc.service = "KMS",
            rpc.method = method,
            http.request.method = "POST",
            url.path = "/prpc/KMS.GetMeta",
            client.address = %peer.ip(),
            client.port = peer.port(),
            network.protocol.version = "1.1",
            http.response.status_code = tracing::field::Empty,
        ),
        _ => instrumented_kms::request_span(&instrumented_kms::RequestInfo {
            rpc_method: method.into(),
            url_path: req.uri().path().into(),
            http_method: req.method().to_string(),
            client_addr: Some(peer),
            protocol: instrumented_kms::HttpProtocol::Http11,
        }),
    };
    let mode = s.mode;
    let work = async move {
        if stuck {
            tokio::time::sleep(STUCK_FOR).await;
            return 200;
        }
        cpu_work();
        tokio::task::yield_now().await;
        match mode {
            Mode::Stock => {
                tokio::time::sleep(Duration::from_millis(1))
                    .instrument(tracing::info_span!(
                        "kms.outbound",
                        otel.kind = "client",
                        kms.peer = "auth_webhook",
                        kms.call = "get_info",
                        server.address = "10.0.2.2",
                        server.port = 8000,
                        url.path = "/",
                        http.request.method = "GET",
                    ))
                    .await
            }
            _ => {
                let call = instrumented_kms::OutboundCall::new(
                    instrumented_kms::Peer::AuthWebhook,
                    "get_info",
                )
                .http("GET", "http://10.0.2.2:8000/");
                instrumented_kms::outbound(call, tokio::time::sleep(Duration::from_millis(1))).await
            }
        }
        200
    }
    .instrument(span.clone());
    let status = match s.mode {
        Mode::Off => work.await,
        Mode::Stock => tokio_metrics::TaskMonitor::instrument(&s.stock_monitor, work).await,
        Mode::Ours if s.no_monitor => work.await,
        Mode::Ours => instrumented_kms::monitor_rpc(method, work).await,
    };
    match s.mode {
        Mode::Stock => {
            span.record("http.response.status_code", status);
        }
        _ => instrumented_kms::record_status(&span, status),
    }
    if !stuck {
        s.served.fetch_add(1, Ordering::Relaxed);
    }
    Ok(Response::new(Full::new(Bytes::from_static(b"{}"))))
}

// ---------------------------------------------------------------- load

struct CellResult {
    config: &'static str,
    conns: usize,
    rps: f64,
    p99_ms: f64,
    cpu_us_per_req: f64,
    rss_mb: f64,
    spans_share: f64,
    sampled_share: f64,
    snapshots_share: Option<f64>,
    /// Events the console dropped (from `kms.console`), for configurations with the console.
    console_dropped: Option<u64>,
}

fn parent() {
    if std::env::var_os("BENCH_TASKDUMP_ONLY").is_some() {
        taskdump_cost();
        return;
    }
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let duration = Duration::from_secs_f64(secs);
    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "instrumented-kms benchmark: {secs} s per cell, {rounds} rounds, loads {LOADS:?} connections, {} CPUs",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let mut results = Vec::new();
    let only_configs = std::env::var("BENCH_CONFIGS").ok();
    let only_loads = std::env::var("BENCH_LOADS").ok();
    for round in 0..rounds {
        for &conns in LOADS {
            if only_loads
                .as_ref()
                .is_some_and(|l| !l.split(',').any(|x| x == conns.to_string()))
            {
                continue;
            }
            let configs: Vec<&'static str> = match &only_configs {
                Some(c) => c
                    .split(',')
                    .map(|x| &*Box::leak(x.to_owned().into_boxed_str()))
                    .collect(),
                None => CONFIGS.to_vec(),
            };
            for config in configs {
                let r = run_cell(&load_rt, config, conns, duration);
                print_cell(&format!("round {}", round + 1), &r);
                results.push(r);
            }
        }
    }
    summary(&results);
    if std::env::var_os("BENCH_LONG").is_some() {
        let long_secs: f64 = std::env::var("BENCH_LONG_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60.0);
        println!();
        println!("Long console cell: {long_secs} s at 512 connections");
        let long = Duration::from_secs_f64(long_secs);
        let mut long_results = Vec::new();
        for config in ["fmt-only", "ours-all"] {
            let r = run_cell(&load_rt, config, 512, long);
            print_cell("long", &r);
            long_results.push(r);
        }
        let fmt = &long_results[0];
        let all = &long_results[1];
        println!(
            "  ours-all over {long_secs} s: {:.3} of fmt-only req/s ({:.0} vs {:.0}), peak RSS {:.1} MB (fmt-only {:.1} MB), console dropped {} events",
            all.rps / fmt.rps.max(1.0),
            all.rps,
            fmt.rps,
            all.rss_mb,
            fmt.rss_mb,
            all.console_dropped.unwrap_or(0)
        );
    }
    if std::env::var_os("BENCH_NO_TASKDUMP").is_none() {
        taskdump_cost();
    }
}

fn print_cell(label: &str, r: &CellResult) {
    println!(
        "  {label} {:>3} conns {:<16} {:>8.0} req/s  p99 {:>7.2} ms  {:>6.1} µs CPU/req  RSS {:>6.1} MB  spans {:>5.1}% (sampled out {:>5.1}%)  snapshots {}{}",
        r.conns,
        r.config,
        r.rps,
        r.p99_ms,
        r.cpu_us_per_req,
        r.rss_mb,
        r.spans_share * 100.0,
        r.sampled_share * 100.0,
        r.snapshots_share
            .map(|s| format!("{:.1}%", s * 100.0))
            .unwrap_or_else(|| "n/a".into()),
        r.console_dropped
            .map(|d| format!("  console dropped {d}"))
            .unwrap_or_default()
    );
}

/// Means over rounds, with ratios to `off` and to `fmt-only` at the same load.
fn summary(results: &[CellResult]) {
    println!();
    println!("Means over rounds (ratios to `off` and to `fmt-only` at the same load):");
    println!(
        "{:>5}  {:<19} {:>8} {:>6} {:>6} {:>8} {:>6} {:>6} {:>8} {:>7} {:>7} {:>7} {:>7} {:>8} {:>10} {:>9}",
        "conns",
        "config",
        "req/s",
        "÷off",
        "÷fmt",
        "p99 ms",
        "÷off",
        "÷fmt",
        "µs/req",
        "+off",
        "+fmt",
        "RSS MB",
        "spans",
        "sampled",
        "snapshots",
        "con.drop"
    );
    let mut used: Vec<&'static str> = Vec::new();
    for r in results {
        if !used.contains(&r.config) {
            used.push(r.config);
        }
    }
    for &conns in LOADS {
        if !results.iter().any(|r| r.conns == conns) {
            continue;
        }
        let mean = |config: &str, f: &dyn Fn(&CellResult) -> f64| {
            let v: Vec<f64> = results
                .iter()
                .filter(|r| r.conns == conns && r.config == config)
                .map(f)
                .collect();
            if v.is_empty() {
                return f64::NAN;
            }
            v.iter().sum::<f64>() / v.len() as f64
        };
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        let (off_rps, off_p99, off_cpu) = (
            mean("off", &|r| r.rps),
            mean("off", &|r| r.p99_ms),
            mean("off", &|r| r.cpu_us_per_req),
        );
        let (fmt_rps, fmt_p99, fmt_cpu) = (
            mean("fmt-only", &|r| r.rps),
            mean("fmt-only", &|r| r.p99_ms),
            mean("fmt-only", &|r| r.cpu_us_per_req),
        );
        for &config in &used {
            let rps = mean(config, &|r| r.rps);
            let p99 = mean(config, &|r| r.p99_ms);
            let cpu = mean(config, &|r| r.cpu_us_per_req);
            let rss = results
                .iter()
                .filter(|r| r.conns == conns && r.config == config)
                .map(|r| r.rss_mb)
                .fold(0.0, f64::max);
            let spans = mean(config, &|r| r.spans_share);
            let sampled = mean(config, &|r| r.sampled_share);
            let snaps: Vec<f64> = results
                .iter()
                .filter(|r| r.conns == conns && r.config == config)
                .filter_map(|r| r.snapshots_share)
                .collect();
            let drops: Vec<u64> = results
                .iter()
                .filter(|r| r.conns == conns && r.config == config)
                .filter_map(|r| r.console_dropped)
                .collect();
            println!(
                "{:>5}  {:<19} {:>8.0} {:>6.3} {:>6.3} {:>8.2} {:>6.2} {:>6.2} {:>8.1} {:>7.1} {:>7.1} {:>7.1} {:>6.1}% {:>7.1}% {:>10} {:>9}",
                conns,
                config,
                rps,
                ratio(rps, off_rps),
                ratio(rps, fmt_rps),
                p99,
                ratio(p99, off_p99),
                ratio(p99, fmt_p99),
                cpu,
                cpu - off_cpu,
                cpu - fmt_cpu,
                rss,
                if config == "off" { 0.0 } else { spans * 100.0 },
                sampled * 100.0,
                if snaps.is_empty() {
                    "n/a".to_string()
                } else {
                    format!("{:.1}%", snaps.iter().sum::<f64>() / snaps.len() as f64 * 100.0)
                },
                if drops.is_empty() {
                    "n/a".to_string()
                } else {
                    drops.iter().sum::<u64>().to_string()
                }
            );
        }
    }
    println!("(RSS = peak of the server process; spans = closed kms.request/kms.outbound spans received / emitted; sampled = not exported by our trace rate limit (counted, by design); the rest of the gap is dropped; snapshots = open-span snapshots received / taken; con.drop = events the console dropped, from kms.console, summed over rounds.)");
}

/// Stuck "handlers": a request span around an await on a oneshot that is
/// never answered, two async fns deep.
#[inline(never)]
async fn bench_wait_for_answer(answer: tokio::sync::oneshot::Receiver<()>) {
    let _ = answer.await;
}

#[inline(never)]
async fn bench_stuck_handler(answer: tokio::sync::oneshot::Receiver<()>) {
    bench_wait_for_answer(answer).await;
}

/// The period of the concurrent request loop (`BENCH_TASKDUMP_PING_MS`, default 10).
fn ping_every() -> Duration {
    Duration::from_millis(
        std::env::var("BENCH_TASKDUMP_PING_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10),
    )
}

/// Prints what a task dump costs: the dump itself (the runtime pauses for
/// it), symbolizing one task's trace, and a concurrent request's latency.
fn taskdump_cost() {
    let idle: usize = std::env::var("BENCH_TASKDUMP_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    const DUMPS: usize = 20;
    let rt = instrumented_kms::runtime_builder(Some(2)).build().unwrap();
    let mut senders = Vec::with_capacity(idle);
    for _ in 0..idle {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        senders.push(tx);
        rt.spawn(bench_stuck_handler(rx));
    }
    // A request loop running through the dumps: its worst latency is what a
    // healthy request pays when a dump lands.
    let stop = Arc::new(AtomicBool::new(false));
    let worst_us = Arc::new(AtomicU64::new(0));
    let pinger = {
        let (stop, worst_us) = (stop.clone(), worst_us.clone());
        rt.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if std::env::var_os("BENCH_NO_PINGER").is_some() {
                    break;
                }
                let t = Instant::now();
                tokio::time::sleep(ping_every()).await;
                let took = t.elapsed().as_micros() as u64;
                worst_us.fetch_max(took, Ordering::Relaxed);
            }
        })
    };
    let dumper = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let handle = rt.handle().clone();
    let mut times = Vec::with_capacity(DUMPS);
    let mut tasks = 0;
    let mut last = None;
    let mut timeouts = 0;
    for _ in 0..DUMPS {
        let t = Instant::now();
        // As the library does: a dump that does not come back in time is
        // counted, not waited for.
        let dump = dumper
            .block_on(async { tokio::time::timeout(Duration::from_secs(2), handle.dump()).await });
        match dump {
            Ok(dump) => {
                times.push(t.elapsed());
                tasks = dump.tasks().iter().count();
                last = Some(dump);
            }
            Err(_) => timeouts += 1,
        }
    }
    if times.is_empty() {
        println!("Task dump: all {DUMPS} dumps timed out after 2 s");
        stop.store(true, Ordering::Relaxed);
        return;
    }
    stop.store(true, Ordering::Relaxed);
    rt.block_on(pinger).unwrap();
    let during_worst = worst_us.load(Ordering::Relaxed);
    let baseline_worst = {
        worst_us.store(0, Ordering::Relaxed);
        let worst = worst_us.clone();
        rt.block_on(async move {
            for _ in 0..100 {
                let t = Instant::now();
                tokio::time::sleep(ping_every()).await;
                worst.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
        });
        worst_us.load(Ordering::Relaxed)
    };
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mean = times.iter().map(|d| ms(*d)).sum::<f64>() / times.len() as f64;
    let one = last.as_ref().and_then(|d| d.tasks().iter().next());
    let resolve = |task: &tokio::runtime::dump::Task| {
        let t = Instant::now();
        let frames: usize = task
            .trace()
            .resolve_backtraces()
            .iter()
            .map(|b| b.frames().count())
            .sum();
        (t.elapsed(), frames)
    };
    let (first_resolve, frames) = one.map(resolve).unwrap_or_default();
    let (again_resolve, _) = one.map(resolve).unwrap_or_default();
    println!();
    println!(
        "Task dump of {tasks} tasks ({idle} stuck handlers), {} dumps ({timeouts} timed out): mean {mean:.2} ms, median {:.2} ms, max {:.2} ms",
        times.len(),
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1])
    );
    println!(
        "  symbolizing one task's trace ({frames} frames): first {:.1} ms (loads debug info), then {:.2} ms",
        ms(first_resolve),
        ms(again_resolve)
    );
    println!(
        "  worst latency of a concurrent sleep loop ({:?} period): {:.2} ms during the dumps, {:.2} ms without",
        ping_every(),
        during_worst as f64 / 1e3,
        baseline_worst as f64 / 1e3
    );
    drop(senders);
}

fn run_cell(
    rt: &tokio::runtime::Runtime,
    config: &'static str,
    conns: usize,
    duration: Duration,
) -> CellResult {
    let receiver = support::Receiver::start();
    let mut child = Command::new(std::env::current_exe().unwrap());
    let mut child = child
        .args(["--cell", config, &receiver.endpoint()])
        .env("TOKIO_CONSOLE_BIND", "127.0.0.1:0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let port: u16 = loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "server exited early");
        if let Some(p) = line.trim().strip_prefix("READY ") {
            break p.parse().unwrap();
        }
    };
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    // `BENCH_PERF=DIR`: the server's CPU sampled from READY to the end of
    // the load, the requests `served` counts.
    let perf_dir = std::env::var_os("BENCH_PERF").map(std::path::PathBuf::from);
    let perf_out = perf_dir
        .as_ref()
        .map(|dir| dir.join(format!("{config}-{conns}")));
    let perf = perf_out.as_ref().and_then(|out| {
        Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F", "1999", "-p"])
            .arg(child.id().to_string())
            .arg("-o")
            .arg(out.with_extension("perf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
    });
    let latencies = rt.block_on(load(addr, conns, duration));
    if let Some(mut perf) = perf {
        let _ = Command::new("kill")
            .args(["-INT", &perf.id().to_string()])
            .status();
        let _ = perf.wait();
    }
    // Stop the server: it reports, flushes and exits.
    drop(child.stdin.take());
    let mut stats = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if line.starts_with("STATS") {
            stats = line.clone();
        }
    }
    let _ = child.wait();
    let field = |name: &str| -> f64 {
        stats
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let served = field("served");
    if let Some(out) = &perf_out {
        // What the samples are scaled by: the server's CPU per request.
        let _ = std::fs::write(
            out.with_extension("served"),
            format!("{served} {}\n", field("cpu_us")),
        );
    }
    let mut sorted = latencies;
    sorted.sort_unstable();
    let p99 = sorted
        .get((sorted.len() as f64 * 0.99) as usize)
        .copied()
        .unwrap_or_default();
    let delivered = receiver.count_spans(|s, scope| {
        scope != "instrumented-kms.open-spans"
            && !s.attributes.iter().any(|kv| kv.key == "incomplete")
            && (s.name == "kms.request" || s.name == "kms.outbound")
    }) as f64;
    let emitted = 2.0 * served + STUCK as f64;
    let snapshots_received =
        receiver.count_spans(|_, scope| scope == "instrumented-kms.open-spans") as f64;
    let snapshots_taken = field("snapshots");
    let console_dropped = receiver
        .events("kms.console")
        .iter()
        .filter_map(|e| e.int_attr("console.dropped_events_total"))
        .max()
        .map(|n| u64::try_from(n).unwrap_or(0));
    CellResult {
        config,
        conns,
        rps: sorted.len() as f64 / duration.as_secs_f64(),
        p99_ms: p99.as_secs_f64() * 1000.0,
        cpu_us_per_req: field("cpu_us") / served.max(1.0),
        rss_mb: field("maxrss_kb") / 1024.0,
        spans_share: (delivered / emitted.max(1.0)).min(1.0),
        sampled_share: field("sampled_out") / emitted.max(1.0),
        snapshots_share: config
            .starts_with("ours")
            .then(|| snapshots_received / snapshots_taken.max(1.0)),
        console_dropped,
    }
}

/// `conns` keep-alive connections, each sending requests back to back for
/// `duration` after a warm-up, plus `STUCK` requests that stay open.
async fn load(addr: SocketAddr, conns: usize, duration: Duration) -> Vec<Duration> {
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let mut stuck = Vec::new();
    for _ in 0..STUCK {
        stuck.push(tokio::spawn(async move {
            let mut sender = connect(addr).await;
            let _ = request(&mut sender, "/stuck").await;
        }));
    }
    let mut workers = Vec::new();
    for _ in 0..conns {
        let stop = stop.clone();
        let measuring = measuring.clone();
        let total = total.clone();
        workers.push(tokio::spawn(async move {
            let mut sender = connect(addr).await;
            let mut lat = Vec::with_capacity(4096);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                if request(&mut sender, "/prpc/KMS.GetMeta").await.is_err() {
                    sender = connect(addr).await;
                    continue;
                }
                total.fetch_add(1, Ordering::Relaxed);
                if measuring.load(Ordering::Relaxed) {
                    lat.push(t.elapsed());
                }
            }
            lat
        }));
    }
    tokio::time::sleep(WARMUP).await;
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(duration).await;
    measuring.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap_or_default());
    }
    for s in stuck {
        let _ = s.await;
    }
    let _ = total.load(Ordering::Relaxed);
    all
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> Sender {
    loop {
        if let Ok(stream) = tokio::net::TcpStream::connect(addr).await {
            let _ = stream.set_nodelay(true);
            if let Ok((sender, conn)) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
            {
                tokio::spawn(conn);
                return sender;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn request(sender: &mut Sender, path: &str) -> Result<(), hyper::Error> {
    sender.ready().await?;
    let response = sender
        .send_request(Request::get(path).body(Empty::new()).unwrap())
        .await?;
    response.into_body().collect().await?;
    Ok(())
}
