//! One lab run: collector in-process, twin as a child process, GetMeta
//! poller, console recorder and background load; warm-up, fault injection,
//! wait for the hang and a stable report.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use kms_collector::analyse::AnalyseConfig;
use kms_collector::console::{ConsoleConfig, SnapshotSink};
use kms_collector::probe::{ProbeConfig, ProbeSink, SinkError};
use kms_collector::report::{build_report, render_html, render_json, render_text, ReportOptions};
use kms_collector::serve::{Server, ServerConfig, StoreSink};
use kms_collector::store::{
    ConsoleSnapshot, ProbeAttempt, ProbeOutcome, Reader, Record, SqliteReader, StoreHandle,
    TimeWindow,
};
use serde_json::Value;

use crate::fault::Fault;
use crate::lab::cases::Case;
use crate::lab::child::{TwinLaunch, TwinProcess};
use crate::lab::client::KmsClient;
use crate::lab::expect::LETTERS;
use crate::lab::load::Load;
use crate::lab::progress::Progress;
use crate::twin::admin::TwinState;

/// How a lab run is set up. `Default` is what `kms-lab` uses.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// The `kms-twin` binary (or a binary that runs the twin behind
    /// [`LabConfig::twin_subcommand`]).
    pub twin_binary: PathBuf,
    /// Arguments before the twin's own, e.g. `["twin"]` for `kms-lab twin`.
    pub twin_subcommand: Vec<OsString>,
    /// Worker threads of the twin's runtime.
    pub workers: usize,
    /// Time between GetMeta probes.
    pub probe_interval: Duration,
    /// Limit of each probe phase (connect, TLS, answer).
    pub probe_timeout: Duration,
    /// Successful probes required before the fault is injected.
    pub warmup_probes: usize,
    /// Longest warm-up.
    pub warmup_timeout: Duration,
    /// After the probe first sees the hang, wait at least this long before
    /// taking a verdict (open-span threshold, snapshot interval, console
    /// snapshots and lock-wait threshold all need to pass).
    pub settle: Duration,
    /// The verdicts must stay the same this long.
    pub stable_for: Duration,
    /// With no fault, watch this long after the (non-)injection.
    pub observe_healthy: Duration,
    /// Give up waiting for a stable verdict after this long from injection.
    pub verdict_timeout: Duration,
    /// Time between two report evaluations while waiting.
    pub report_every: Duration,
    /// Background load: one wave of calls every this long.
    pub load_period: Duration,
    /// Background load: each call gives up after this long.
    pub load_deadline: Duration,
    /// Memory limit of the twin (`memory-leak` approaches it).
    pub memory_limit: &'static str,
    /// Bytes each request leaks under `memory-leak`.
    pub leak_per_request: &'static str,
    /// instrumented-kms configuration of the twin (`KMS_DIAG_*`): short
    /// thresholds and intervals so a run takes seconds.
    pub diag_env: Vec<(String, String)>,
    /// The collector's diagnosis thresholds.
    pub analyse: AnalyseConfig,
    /// Console recorder snapshot interval.
    pub console_snapshot_interval: Duration,
    /// Print progress lines on stderr.
    pub progress: bool,
    /// Also serve Jaeger's remote-storage API from the collector on this
    /// address (`serve --jaeger-storage`), for a Jaeger reading the run live.
    pub jaeger_storage: Option<std::net::SocketAddr>,
}

impl Default for LabConfig {
    fn default() -> Self {
        let diag_env = [
            ("KMS_DIAG_OPEN_SPAN_THRESHOLD", "2s"),
            ("KMS_DIAG_OPEN_SPAN_INTERVAL", "1s"),
            // Await chains of stuck requests (opt-in: a dump can stall a
            // busy runtime; the lab's load is light).
            ("KMS_DIAG_TASKDUMP", "1"),
            ("KMS_DIAG_STALL_POLL_THRESHOLD", "1s"),
            ("KMS_DIAG_STALL_HEARTBEAT_THRESHOLD", "2s"),
            ("KMS_DIAG_DEADLOCK_INTERVAL", "1s"),
            ("KMS_DIAG_METRICS_INTERVAL", "1s"),
            ("KMS_DIAG_PROCESS_INTERVAL", "1s"),
            ("KMS_DIAG_LOG", "info"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        LabConfig {
            twin_binary: PathBuf::from("kms-twin"),
            twin_subcommand: Vec::new(),
            workers: 2,
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(3),
            warmup_probes: 3,
            warmup_timeout: Duration::from_secs(40),
            settle: Duration::from_secs(8),
            stable_for: Duration::from_secs(4),
            observe_healthy: Duration::from_secs(10),
            verdict_timeout: Duration::from_secs(75),
            report_every: Duration::from_secs(2),
            load_period: Duration::from_millis(500),
            load_deadline: Duration::from_secs(3),
            // A small CVM's budget. Not lower: resolving the backtraces of a
            // parking_lot deadlock report loads the binary's debug info and
            // costs the twin ~200 MiB of RSS in a debug build.
            memory_limit: "1GiB",
            leak_per_request: "16MiB",
            diag_env,
            analyse: AnalyseConfig {
                lock_wait_threshold: Duration::from_secs(3),
                ..AnalyseConfig::default()
            },
            console_snapshot_interval: Duration::from_secs(1),
            progress: true,
            jaeger_storage: None,
        }
    }
}

/// What one run produced.
#[derive(Debug)]
pub struct ScenarioResult {
    /// The case run.
    pub case: Case,
    /// The fault injected.
    pub fault: Fault,
    /// The collector's JSON report at the end.
    pub report: Value,
    /// The same report as text.
    pub report_text: String,
    /// Where the database, report and exports are.
    pub dir: PathBuf,
    /// How long after injection the probe saw the hang.
    pub hang_seen_after: Option<Duration>,
    /// How long after injection the final verdicts first appeared.
    pub verdict_after: Option<Duration>,
    /// True when the verdicts never settled before the timeout.
    pub timed_out: bool,
    /// The twin's counters at the end (none if its admin endpoint was out of reach).
    pub twin_state: Option<TwinState>,
    /// Background load `(sent, ok, timed_out, failed)`.
    pub load: (u64, u64, u64, u64),
    /// False when the twin's tokio-console showed none of the request
    /// handler tasks at the end of warm-up (console-based evidence is then
    /// missing through no fault of the diagnosis).
    pub console_sees_handlers: bool,
    _tmp: Option<tempfile::TempDir>,
}

/// Files a run leaves in its directory.
pub mod files {
    /// The collector's SQLite database.
    pub const DB: &str = "kms-diag.sqlite";
    /// The JSON report.
    pub const REPORT_JSON: &str = "report.json";
    /// The text report.
    pub const REPORT_TEXT: &str = "report.txt";
    /// The HTML report.
    pub const REPORT_HTML: &str = "report.html";
    /// Jaeger JSON export of every span.
    pub const JAEGER: &str = "jaeger.json";
    /// OTLP JSON export of every span.
    pub const OTLP: &str = "otlp.json";
    /// The twin's stdout and stderr.
    pub const TWIN_LOG: &str = "twin.log";
}

/// Keeps every probe attempt in memory (for progress and the hang
/// condition) and hands it on to the store.
struct LabProbeSink {
    store: StoreSink,
    seen: Arc<Mutex<Vec<ProbeAttempt>>>,
}

impl ProbeSink for LabProbeSink {
    fn write_probe(&self, attempt: &ProbeAttempt) -> Result<(), SinkError> {
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(attempt.clone());
        }
        self.store.write_probe(attempt)
    }
}

/// Console snapshots into the store (the recorder's sink in the lab and the
/// soak).
#[derive(Debug)]
pub struct ConsoleStoreSink(pub StoreHandle);

impl SnapshotSink for ConsoleStoreSink {
    fn write_console_snapshot(&self, snapshot: &ConsoleSnapshot) -> Result<(), SinkError> {
        self.0
            .write_blocking(vec![Record::Console(snapshot.clone())])
            .map_err(|e| Box::new(e) as SinkError)
    }
}

/// The probe's record since `since_ns`: (ok, failed, consecutive failures
/// at the end, last failure class).
fn probe_status(seen: &Mutex<Vec<ProbeAttempt>>, since_ns: i64) -> (usize, usize, usize, String) {
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let recent: Vec<&ProbeAttempt> = seen.iter().filter(|a| a.time_ns >= since_ns).collect();
    let ok = recent
        .iter()
        .filter(|a| a.outcome == ProbeOutcome::Ok)
        .count();
    let consecutive = recent
        .iter()
        .rev()
        .take_while(|a| a.outcome != ProbeOutcome::Ok)
        .count();
    let class = recent
        .iter()
        .rev()
        .find(|a| a.outcome != ProbeOutcome::Ok)
        .map(|a| a.outcome.as_str().to_owned())
        .unwrap_or_else(|| "-".into());
    (ok, recent.len() - ok, consecutive, class)
}

fn unix_ns(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A compact verdict line, e.g. `A- B+ C- D- E-` (+ confirmed, - ruled out,
/// ? inconclusive).
pub fn signature(report: &Value) -> String {
    LETTERS
        .iter()
        .map(|l| {
            let mark = match report["hypotheses"][l]["verdict"].as_str() {
                Some("confirmed") => "+",
                Some("ruled_out") => "-",
                Some("inconclusive") => "?",
                _ => ".",
            };
            format!("{l}{mark}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The report of the database at `db`, as JSON.
async fn report_now(db: &Path, analyse: &AnalyseConfig) -> anyhow::Result<Value> {
    let (db, config) = (db.to_owned(), analyse.clone());
    tokio::task::spawn_blocking(move || {
        let reader = SqliteReader::open(&db)?;
        let opts = ReportOptions {
            config,
            ..ReportOptions::default()
        };
        let report = build_report(&reader, &opts)?;
        Ok(serde_json::from_str(&render_json(&report))?)
    })
    .await?
}

/// What the warm-up still lacks, or `None` once telemetry flows.
fn warmup_missing(db: &Path) -> anyhow::Result<Option<String>> {
    let reader = SqliteReader::open(db)?;
    let mut missing = Vec::new();
    for event in ["kms.runtime", "kms.process"] {
        if reader.events(event, TimeWindow::ALL)?.is_empty() {
            missing.push(format!("{event} events"));
        }
    }
    if reader.spans(TimeWindow::ALL, 1)?.is_empty() {
        missing.push("spans".to_owned());
    }
    if reader.console_snapshot_times(TimeWindow::ALL)?.is_empty() {
        missing.push("console snapshots".to_owned());
    }
    Ok((!missing.is_empty()).then(|| missing.join(", ")))
}

/// Whether the newest console snapshot holds a task spawned by the twin's
/// request handling (`twin/server.rs`).
fn console_sees_handlers(db: &Path) -> anyhow::Result<bool> {
    let reader = SqliteReader::open(db)?;
    let Some(&newest) = reader.console_snapshot_times(TimeWindow::ALL)?.last() else {
        return Ok(false);
    };
    Ok(reader.console_snapshot(newest)?.tasks.iter().any(|t| {
        t.spawn_location
            .as_deref()
            .is_some_and(|l| l.contains("twin/server.rs"))
    }))
}

/// A port that was free a moment ago (console-subscriber cannot report the
/// port it bound, so the lab picks one).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs the case of `fault` ([`Case::of`]) once; see [`run_case`].
///
/// # Errors
/// As [`run_case`].
pub async fn run_scenario(
    fault: Fault,
    config: &LabConfig,
    keep: Option<&Path>,
) -> anyhow::Result<ScenarioResult> {
    run_case(&Case::of(fault), config, keep).await
}

/// Waits until the probe has failed at least once (deadline: 15 s).
async fn first_probe_failure(seen: &Mutex<Vec<ProbeAttempt>>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, failed, _, _) = probe_status(seen, 0);
        if failed > 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the probe did not fail once against a twin that is not running");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `case` once: see the module docs. `keep`: write everything into
/// this directory (created if missing) instead of a temporary one.
///
/// # Errors
/// When a part cannot start, or telemetry does not flow during warm-up.
pub async fn run_case(
    case: &Case,
    config: &LabConfig,
    keep: Option<&Path>,
) -> anyhow::Result<ScenarioResult> {
    let fault = case.fault;
    let setup = case.setup;
    let mut progress = Progress::new(case.name, config.progress);
    let (dir, tmp) = match keep {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            (dir.to_owned(), None)
        }
        None => {
            let tmp = tempfile::Builder::new()
                .prefix(&format!("kms-lab-{}-", case.name))
                .tempdir()?;
            (tmp.path().to_owned(), Some(tmp))
        }
    };
    let db = dir.join(files::DB);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }

    progress.status("starting", "collector");
    let any = "127.0.0.1:0".parse()?;
    let server = Server::start(
        ServerConfig::default()
            .db(db.clone())
            .otlp_grpc(any)
            .otlp_http(any)
            .jaeger_storage(config.jaeger_storage),
    )
    .await
    .context("starting the collector")?;

    // The probe's target: known before the twin runs when the collector
    // starts first.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kms_port = if setup.collector_first {
        free_port()?
    } else {
        0
    };
    let start_probe = |kms_url: &str| {
        kms_collector::probe::spawn(
            ProbeConfig::new(format!("{kms_url}{}", setup.probe_rpc.path()))
                .interval(config.probe_interval)
                .timeout(config.probe_timeout)
                .http1_only(setup.probe_http1_only),
            Arc::new(LabProbeSink {
                store: StoreSink::new(server.store()),
                seen: seen.clone(),
            }),
        )
    };
    let early_probe = if setup.collector_first {
        progress.status("starting", "probe (the twin is not running yet)");
        let scheme = if setup.plain_http { "http" } else { "https" };
        let probe = start_probe(&format!("{scheme}://127.0.0.1:{kms_port}"))?;
        first_probe_failure(&seen).await?;
        Some(probe)
    } else {
        None
    };

    progress.status("starting", "twin");
    let console_port = free_port()?;
    let mut env = config.diag_env.clone();
    env.push((
        "KMS_DIAG_OTLP_ENDPOINT".into(),
        format!("http://{}", server.grpc_addr()),
    ));
    // The limit `memory-leak` approaches, for a library that lets the host
    // state it (instrumented-kms otherwise reports cgroup memory.max or
    // MemTotal; see the crate docs).
    if let Ok(bytes) = crate::twin::parse_bytes(config.memory_limit) {
        env.push(("KMS_DIAG_MEMORY_LIMIT".into(), bytes.to_string()));
    }
    env.push((
        "KMS_DIAG_CONSOLE_BIND".into(),
        format!("127.0.0.1:{console_port}"),
    ));
    let mut args: Vec<OsString> = vec![
        "--listen".into(),
        format!("127.0.0.1:{kms_port}").into(),
        "--workers".into(),
        config.workers.to_string().into(),
        "--attest-clients".into(),
        "--memory-limit".into(),
        config.memory_limit.into(),
        "--leak-per-request".into(),
        config.leak_per_request.into(),
    ];
    if setup.plain_http {
        args.push("--plain-http".into());
    }
    if let Some(limit) = setup.fd_limit {
        args.push("--fd-limit".into());
        args.push(limit.to_string().into());
    }
    if let Some(max) = setup.max_blocking_threads {
        args.push("--max-blocking-threads".into());
        args.push(max.to_string().into());
    }
    let launch = TwinLaunch {
        binary: config.twin_binary.clone(),
        subcommand: config.twin_subcommand.clone(),
        args,
        env,
        log: dir.join(files::TWIN_LOG),
        ready_file: dir.join("twin.ready"),
    };
    let mut twin = TwinProcess::start(&launch, Duration::from_secs(30)).await?;

    let console = kms_collector::console::spawn(
        ConsoleConfig::new(format!("http://127.0.0.1:{console_port}"))
            .snapshot_interval(config.console_snapshot_interval),
        Arc::new(ConsoleStoreSink(server.store())),
    )?;
    let probe = match early_probe {
        Some(probe) => probe,
        None => start_probe(&twin.ready.kms_url)?,
    };
    let load = Load::start_with(
        KmsClient::new(&twin.ready, setup.load_protocol)?,
        setup.load_wave,
        setup.load_repeat,
        setup.load_period.unwrap_or(config.load_period),
        setup.load_deadline.unwrap_or(config.load_deadline),
    );

    // Warm-up: healthy probes and telemetry of every kind arriving.
    let warmup_started = Instant::now();
    loop {
        let (ok, _, _, _) = probe_status(&seen, 0);
        let missing = {
            let db = db.clone();
            tokio::task::spawn_blocking(move || warmup_missing(&db)).await??
        };
        if ok >= config.warmup_probes && missing.is_none() {
            break;
        }
        let waiting_for = match (&missing, ok >= config.warmup_probes) {
            (Some(m), true) => m.clone(),
            (Some(m), false) => format!("{m}, healthy probes ({ok}/{})", config.warmup_probes),
            (None, _) => format!("healthy probes ({ok}/{})", config.warmup_probes),
        };
        if !twin.is_running() {
            bail!(
                "the twin exited during warm-up; its log ends with:\n{}",
                crate::lab::child::log_tail(&launch.log)
            );
        }
        if warmup_started.elapsed() > config.warmup_timeout {
            bail!(
                "warm-up did not finish within {:?}: still no {waiting_for}",
                config.warmup_timeout
            );
        }
        progress.status("warm-up", &format!("waiting for {waiting_for}"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let console_sees_handlers = {
        let db = db.clone();
        tokio::task::spawn_blocking(move || console_sees_handlers(&db)).await??
    };
    if !console_sees_handlers {
        progress.status(
            "warning",
            "the twin's tokio-console shows none of its request tasks; console-based evidence will be missing",
        );
    }

    // Inject.
    progress.status("inject", fault.name());
    if fault != Fault::None {
        twin.inject(fault).await.context("injecting the fault")?;
    }
    let injected = Instant::now();
    let injected_ns = unix_ns(SystemTime::now());

    let mut hang_at: Option<Instant> = None;
    let mut last_sig = String::new();
    let mut sig_since = Instant::now();
    let mut report = Value::Null;
    let mut next_report = Instant::now();
    let timed_out = loop {
        let (ok, failed, consecutive, class) = probe_status(&seen, injected_ns);
        if case.hangs() && hang_at.is_none() && consecutive >= 2 {
            hang_at = Some(Instant::now());
        }
        if Instant::now() >= next_report {
            next_report = Instant::now() + config.report_every;
            match report_now(&db, &config.analyse).await {
                Ok(r) => {
                    let sig = signature(&r);
                    if sig != last_sig {
                        last_sig = sig;
                        sig_since = Instant::now();
                    }
                    report = r;
                }
                Err(e) => progress.status("report", &format!("failed: {e:#}")),
            }
        }
        let settled = sig_since.elapsed() >= config.stable_for && !report.is_null();
        let done = if case.hangs() {
            hang_at.is_some_and(|h| h.elapsed() >= config.settle) && settled
        } else {
            injected.elapsed() >= config.observe_healthy && settled
        };
        if done {
            break false;
        }
        if injected.elapsed() > config.verdict_timeout {
            break true;
        }
        let phase = match (case.hangs(), hang_at) {
            (false, _) => "observing",
            (true, None) => "waiting for the hang",
            (true, Some(_)) => "waiting for a stable verdict",
        };
        progress.status(
            phase,
            &format!("probe ok {ok} failed {failed} (last failure: {class}, {consecutive} in a row) | {last_sig}"),
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let verdict_after = sig_since.checked_duration_since(injected);
    let hang_seen_after = hang_at.and_then(|h| h.checked_duration_since(injected));
    progress.status(
        if timed_out { "timed out" } else { "verdict" },
        &format!(
            "{last_sig}, first seen {:.1}s after injection",
            verdict_after.unwrap_or_default().as_secs_f64()
        ),
    );

    // Tear down: the twin may be wedged for good, so it is killed.
    let load_stats = load.stats.snapshot();
    drop(load);
    let _ = probe.stop().await;
    let _ = console.stop().await;
    let twin_state = tokio::time::timeout(Duration::from_secs(2), twin.state())
        .await
        .ok()
        .and_then(Result::ok);
    twin.kill().await;
    server.shutdown().await.context("flushing the collector")?;

    // The final report and exports, from the file alone.
    let (report, text) = {
        let (db, dir, config) = (db.clone(), dir.clone(), config.analyse.clone());
        tokio::task::spawn_blocking(move || write_outputs(&db, &dir, config)).await??
    };
    Ok(ScenarioResult {
        case: *case,
        fault,
        report,
        report_text: text,
        dir,
        hang_seen_after,
        verdict_after,
        timed_out,
        twin_state,
        load: load_stats,
        console_sees_handlers,
        _tmp: tmp,
    })
}

/// Writes the JSON, text and HTML reports and the Jaeger and OTLP exports
/// into `dir`; returns the JSON report and the text.
fn write_outputs(db: &Path, dir: &Path, config: AnalyseConfig) -> anyhow::Result<(Value, String)> {
    use kms_collector::export::{render, select_spans, ExportFormat, Selection};
    let reader = SqliteReader::open(db)?;
    let opts = ReportOptions {
        config,
        ..ReportOptions::default()
    };
    let report = build_report(&reader, &opts)?;
    let json = render_json(&report);
    let text = render_text(&report);
    std::fs::write(dir.join(files::REPORT_JSON), &json)?;
    std::fs::write(dir.join(files::REPORT_TEXT), &text)?;
    std::fs::write(dir.join(files::REPORT_HTML), render_html(&report))?;
    let spans = select_spans(&reader, &Selection::All)?;
    std::fs::write(
        dir.join(files::JAEGER),
        render(&spans, ExportFormat::JaegerJson),
    )?;
    std::fs::write(
        dir.join(files::OTLP),
        render(&spans, ExportFormat::OtlpJson),
    )?;
    Ok((serde_json::from_str(&json)?, text))
}
