//! Soak: the twin with every instrumented-kms part on (OTLP export to a
//! collector, tokio-console with the collector's recorder attached, runtime
//! and task metrics, watchdog, deadlock checks, process facts, task dumps)
//! under steady load for a long time, printing every minute what would grow
//! if something leaked.
//!
//! ```text
//! cargo run --release -p kms-twin --example soak            # 10 minutes
//! cargo run --release -p kms-twin --example soak -- 3       # 3 minutes
//! ```
//!
//! Prints figures; it asserts nothing. The lab's parts are reused: the twin
//! runs as a child process ([`TwinProcess`], this binary's `twin`
//! subcommand, as `kms-lab twin`), the load is the lab's boot waves
//! ([`Load`]), the collector is in-process with the lab's settings.
//!
//! Every report line: the twin's RSS and open fds (read from `/proc/PID`),
//! its export queue (`export.queued`, `export.in_flight` and the drop
//! totals the twin reports on `kms.process`), the events its console dropped
//! and the tasks it did not record past its cap (`kms.console`), and the
//! load's answered and failed calls. At the end:
//! RSS growth and fd growth from the end of warm-up to the end.
//!
//! Environment: `SOAK_MINUTES` (default 10; the first argument wins),
//! `SOAK_REPORT_SECS` (default 60), `SOAK_WARMUP_SECS` (default 120: past the
//! console's 60 s retention, whose window fills first), `SOAK_WAVES` (boot
//! waves sent at once every 100 ms, default 4: about 120 calls per second,
//! each a fresh TLS connection as a booting CVM makes), `SOAK_KEEP` (a
//! directory to keep the database and the twin's log in).

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use clap::Parser as _;
use kms_collector::console::ConsoleConfig;
use kms_collector::serve::{Server, ServerConfig};
use kms_collector::store::{Reader, SqliteReader, TimeWindow};
use kms_twin::lab::cases::BOOT_WAVE;
use kms_twin::lab::child::{TwinLaunch, TwinProcess};
use kms_twin::lab::client::{KmsClient, Protocol};
use kms_twin::lab::load::Load;
use kms_twin::lab::scenario::{ConsoleStoreSink, LabConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "twin") {
        let twin_args = kms_twin::twin::TwinArgs::parse_from(
            std::iter::once(args[0].clone()).chain(args[2..].iter().cloned()),
        );
        return kms_twin::twin::run_as(twin_args, vec!["twin".into()]);
    }
    let minutes: f64 = args
        .get(1)
        .and_then(|a| a.to_str())
        .map(str::to_owned)
        .or_else(|| std::env::var("SOAK_MINUTES").ok())
        .map(|m| m.parse().context("minutes must be a number"))
        .transpose()?
        .unwrap_or(10.0);
    let secs = |name: &str, default: u64| -> anyhow::Result<Duration> {
        Ok(Duration::from_secs(match std::env::var(name) {
            Ok(v) => v
                .parse()
                .with_context(|| format!("{name} must be seconds"))?,
            Err(_) => default,
        }))
    };
    let plan = Plan {
        duration: Duration::from_secs_f64(minutes * 60.0),
        report_every: secs("SOAK_REPORT_SECS", 60)?,
        warmup: secs("SOAK_WARMUP_SECS", 120)?,
        waves: match std::env::var("SOAK_WAVES") {
            Ok(v) => v.parse().context("SOAK_WAVES must be a count")?,
            Err(_) => 4,
        },
        keep: std::env::var_os("SOAK_KEEP").map(Into::into),
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(soak(plan))
}

struct Plan {
    duration: Duration,
    report_every: Duration,
    warmup: Duration,
    waves: usize,
    keep: Option<std::path::PathBuf>,
}

/// One report line's figures.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    rss_kb: u64,
    fds: u64,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `VmRSS` of `pid`, in kB.
fn rss_kb(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// The newest value of integer attribute `key` on event `name`.
fn newest(db: &Path, name: &str, key: &str) -> Option<i64> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?
        .as_nanos() as i64;
    let window = TimeWindow {
        from_ns: now - 120_000_000_000,
        to_ns: i64::MAX,
    };
    let reader = SqliteReader::open(db).ok()?;
    reader
        .events(name, window)
        .ok()?
        .iter()
        .rev()
        .find_map(|e| e.attributes.get(key).and_then(serde_json::Value::as_i64))
}

async fn soak(plan: Plan) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new().prefix("kms-soak-").tempdir()?;
    let dir = plan.keep.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("kms-diag.sqlite");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let any = "127.0.0.1:0".parse()?;
    let server = Server::start(
        ServerConfig::default()
            .db(db.clone())
            .otlp_grpc(any)
            .otlp_http(any),
    )
    .await
    .context("starting the collector")?;

    // The lab's twin configuration: every part on, short intervals.
    let lab = LabConfig::default();
    let console_port = free_port()?;
    let mut env = lab.diag_env.clone();
    env.push((
        "KMS_DIAG_OTLP_ENDPOINT".into(),
        format!("http://{}", server.grpc_addr()),
    ));
    env.push((
        "KMS_DIAG_CONSOLE_BIND".into(),
        format!("127.0.0.1:{console_port}"),
    ));
    // Per-request log lines would only fill the log file.
    env.retain(|(k, _)| k != "KMS_DIAG_LOG");
    env.push(("KMS_DIAG_LOG".into(), "warn".into()));
    let launch = TwinLaunch {
        binary: std::env::current_exe()?,
        subcommand: vec!["twin".into()],
        args: vec![
            "--workers".into(),
            lab.workers.to_string().into(),
            "--attest-clients".into(),
        ],
        env,
        log: dir.join("twin.log"),
        ready_file: dir.join("twin.ready"),
    };
    let mut twin = TwinProcess::start(&launch, Duration::from_secs(30)).await?;
    let pid = twin.ready.pid;
    let console = kms_collector::console::spawn(
        ConsoleConfig::new(format!("http://127.0.0.1:{console_port}"))
            .snapshot_interval(Duration::from_secs(5)),
        Arc::new(ConsoleStoreSink(server.store())),
    )?;
    let load = Load::start_with(
        KmsClient::new(&twin.ready, Protocol::Http1)?,
        BOOT_WAVE,
        plan.waves,
        Duration::from_millis(100),
        lab.load_deadline,
    );
    println!(
        "soak: twin pid {pid}, {:.1} min, {} boot waves every 100 ms, report every {:?}, warm-up {:?}, files in {}",
        plan.duration.as_secs_f64() / 60.0,
        plan.waves,
        plan.report_every,
        plan.warmup,
        dir.display()
    );
    println!(
        "{:>6} {:>8} {:>5} {:>7} {:>9} {:>10} {:>11} {:>9} {:>11} {:>9} {:>8} {:>7}",
        "min",
        "RSS MB",
        "fds",
        "queued",
        "in flight",
        "span drops",
        "event drops",
        "con.drop",
        "con.refused",
        "answered",
        "failed",
        "req/s"
    );
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut last_ok = 0;
    let mut last_at = Duration::ZERO;
    let mut next = started + plan.report_every;
    loop {
        let end = started + plan.duration;
        tokio::time::sleep_until(next.min(end).into()).await;
        if !twin.is_running() {
            anyhow::bail!(
                "the twin exited; its log ends with:\n{}",
                kms_twin::lab::child::log_tail(&launch.log)
            );
        }
        let at = started.elapsed();
        let sample = Sample {
            at,
            rss_kb: rss_kb(pid).unwrap_or(0),
            fds: open_fds(pid).unwrap_or(0),
        };
        let db2 = db.clone();
        let (queued, in_flight, span_drops, event_drops, console_drops, console_refused) =
            tokio::task::spawn_blocking(move || {
                (
                    newest(&db2, "kms.process", "export.queued"),
                    newest(&db2, "kms.process", "export.in_flight"),
                    newest(&db2, "kms.process", "export.dropped_spans_total"),
                    newest(&db2, "kms.process", "export.dropped_events_total"),
                    newest(&db2, "kms.console", "console.dropped_events_total"),
                    newest(&db2, "kms.console", "console.refused_tasks_total"),
                )
            })
            .await?;
        let (_, ok, timed_out, failed) = load.stats.snapshot();
        let rate = (ok - last_ok) as f64 / (at - last_at).as_secs_f64().max(1e-3);
        last_ok = ok;
        last_at = at;
        let show = |v: Option<i64>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
        println!(
            "{:>6.1} {:>8.1} {:>5} {:>7} {:>9} {:>10} {:>11} {:>9} {:>11} {:>9} {:>8} {:>7.0}",
            at.as_secs_f64() / 60.0,
            sample.rss_kb as f64 / 1024.0,
            sample.fds,
            show(queued),
            show(in_flight),
            show(span_drops),
            show(event_drops),
            show(console_drops),
            show(console_refused),
            ok,
            timed_out + failed,
            rate
        );
        samples.push(sample);
        if Instant::now() >= end {
            break;
        }
        next += plan.report_every;
    }
    drop(load);
    let _ = console.stop().await;

    let warm = samples
        .iter()
        .find(|s| s.at >= plan.warmup)
        .or(samples.first())
        .copied();
    let last = samples.last().copied();
    if let (Some(warm), Some(last)) = (warm, last) {
        let peak = samples.iter().map(|s| s.rss_kb).max().unwrap_or(0);
        println!(
            "after warm-up ({:.1} min) to the end ({:.1} min): RSS {:.1} -> {:.1} MB ({:+.1} %, peak {:.1} MB), fds {} -> {} ({:+})",
            warm.at.as_secs_f64() / 60.0,
            last.at.as_secs_f64() / 60.0,
            warm.rss_kb as f64 / 1024.0,
            last.rss_kb as f64 / 1024.0,
            (last.rss_kb as f64 / warm.rss_kb.max(1) as f64 - 1.0) * 100.0,
            peak as f64 / 1024.0,
            warm.fds,
            last.fds,
            last.fds as i64 - warm.fds as i64
        );
    }
    twin.kill().await;
    drop(server);
    Ok(())
}
