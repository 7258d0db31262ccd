//! The GetMeta poller: `kms-collector probe URL` and `serve --probe URL`.
//!
//! Every interval, one `POST {}` to the KMS's prpc `GetMeta` route
//! (`https://HOST:9100/prpc/KMS.GetMeta`) on a fresh connection. Each
//! attempt is timed phase by phase (TCP connect, TLS handshake, HTTP answer,
//! each with its own timeout) so its outcome class is exact: `connect`,
//! `tls`, `timeout` (connected and handshaken, no answer), `http_status`,
//! `other` or `ok`. Every attempt is stored (`probe_attempts`), shown as one
//! status line, and the run reports its time to first failure, counted from
//! the start and from the first success.
//!
//! The KMS serves RA-TLS with a self-signed certificate, so **the probe
//! accepts any server certificate**. It sends nothing secret and only
//! measures liveness. Plain `http://` URLs are probed without TLS.

mod attempt;
mod target;
mod tls;
mod tracker;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use target::{Target, TargetError, DEFAULT_PATH};
pub use tracker::{FirstFailure, ProbeSummary};

use crate::store::{ProbeAttempt, Record, SqliteStore, Writer};
use attempt::{Prober, Timeouts};
use tracker::{status_line, Tracker};

/// An error a [`ProbeSink`] or [`crate::console::SnapshotSink`] reports.
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// Where probe attempts go: the store, or anything else that keeps them.
///
/// `write_probe` may block (it is called from a blocking thread); when it
/// returns `Ok`, the attempt is kept.
pub trait ProbeSink: Send + Sync + 'static {
    /// Keeps one attempt.
    ///
    /// # Errors
    ///
    /// Whatever kept the attempt from being stored; the probe counts it and
    /// goes on.
    fn write_probe(&self, attempt: &ProbeAttempt) -> Result<(), SinkError>;
}

/// A store used directly (the `probe` command, tests): each attempt is one
/// transaction of its own.
impl<W> ProbeSink for std::sync::Mutex<W>
where
    W: Writer + Send + 'static,
{
    fn write_probe(&self, attempt: &ProbeAttempt) -> Result<(), SinkError> {
        let mut writer = self
            .lock()
            .map_err(|_| "the store's lock is poisoned".to_owned())?;
        writer.write(&[Record::Probe(attempt.clone())])?;
        Ok(())
    }
}

/// Errors of [`spawn`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// The URL can't be probed.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// The TLS client configuration could not be built.
    #[error("building the TLS client configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Where the one-line-per-attempt status goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StatusOutput {
    /// A line per attempt on stdout (the `probe` command).
    Stdout,
    /// A `tracing` event per attempt (inside `serve`).
    #[default]
    Tracing,
}

/// Configuration of a probe loop.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use kms_collector::probe::ProbeConfig;
///
/// let config = ProbeConfig::new("https://127.0.0.1:9100/prpc/KMS.GetMeta")
///     .interval(Duration::from_secs(10))
///     .timeout(Duration::from_secs(3))
///     .count(Some(5));
/// assert_eq!(config.target_url(), "https://127.0.0.1:9100/prpc/KMS.GetMeta");
/// ```
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    target: String,
    interval: Duration,
    timeouts: Timeouts,
    count: Option<u64>,
    status: StatusOutput,
    http1_only: bool,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig::new(ProbeConfig::DEFAULT_TARGET)
    }
}

impl ProbeConfig {
    /// Default target: a KMS on this host.
    pub const DEFAULT_TARGET: &'static str = "https://127.0.0.1:9100/prpc/KMS.GetMeta";
    /// Default time between attempt starts.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
    /// Default limit of each phase (connect, TLS handshake, HTTP answer).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// A configuration probing `url` with the defaults.
    pub fn new(url: impl Into<String>) -> Self {
        ProbeConfig {
            target: url.into(),
            interval: Self::DEFAULT_INTERVAL,
            timeouts: Timeouts {
                connect: Self::DEFAULT_TIMEOUT,
                tls: Self::DEFAULT_TIMEOUT,
                request: Self::DEFAULT_TIMEOUT,
            },
            count: None,
            status: StatusOutput::default(),
            http1_only: false,
        }
    }

    /// The URL probed.
    pub fn target_url(&self) -> &str {
        &self.target
    }

    /// Time between the starts of two attempts (default
    /// [`Self::DEFAULT_INTERVAL`]). An attempt that takes longer delays the next.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Sets the limit of every phase (default [`Self::DEFAULT_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeouts = Timeouts {
            connect: timeout,
            tls: timeout,
            request: timeout,
        };
        self
    }

    /// Limit of resolving and TCP connecting (default [`Self::DEFAULT_TIMEOUT`]).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.timeouts.connect = timeout;
        self
    }

    /// Limit of the TLS handshake (default [`Self::DEFAULT_TIMEOUT`]).
    pub fn tls_timeout(mut self, timeout: Duration) -> Self {
        self.timeouts.tls = timeout;
        self
    }

    /// Limit from sending the request to the end of the answer (default
    /// [`Self::DEFAULT_TIMEOUT`]).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.timeouts.request = timeout;
        self
    }

    /// Stop after this many attempts (default `None`: until stopped).
    pub fn count(mut self, count: Option<u64>) -> Self {
        self.count = count;
        self
    }

    /// Offer only HTTP/1.1 in the TLS handshake (default `false`: offer
    /// `h2` first and use what the server picks).
    ///
    /// Over HTTP/2 a timed-out attempt cancels the KMS's handler when the
    /// probe closes the connection. Over HTTP/1.1 upstream's server lets the
    /// handler run on and keeps the socket in CLOSE-WAIT, one per timed-out
    /// attempt: the probe then adds to the fd count it may be asked to judge.
    pub fn http1_only(mut self, http1_only: bool) -> Self {
        self.http1_only = http1_only;
        self
    }

    /// Where each attempt's status line goes (default [`StatusOutput::Tracing`]).
    pub fn status_output(mut self, status: StatusOutput) -> Self {
        self.status = status;
        self
    }
}

/// A running probe loop, from [`spawn`]. Dropping the handle stops the loop.
#[derive(Debug)]
pub struct ProbeHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<ProbeSummary>,
}

impl ProbeHandle {
    /// Stops the loop (an attempt under way is abandoned, not stored) and
    /// returns what the run added up to.
    pub async fn stop(self) -> ProbeSummary {
        let _ = self.stop.send(true);
        self.wait().await
    }

    /// Waits until the loop ends by itself (after `count` attempts).
    pub async fn wait(self) -> ProbeSummary {
        self.task.await.unwrap_or_default()
    }

    /// True once the loop has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Starts a probe loop on the current runtime, writing every attempt to `sink`.
///
/// # Errors
///
/// [`ProbeError::Target`] when the URL can't be probed, [`ProbeError::Tls`]
/// when the TLS configuration can't be built. Nothing runs then.
pub fn spawn(config: ProbeConfig, sink: Arc<dyn ProbeSink>) -> Result<ProbeHandle, ProbeError> {
    let target = Target::parse(&config.target)?;
    let prober = Prober::new(
        target,
        tls::client_config(config.http1_only)?,
        config.timeouts,
    );
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(run_loop(prober, config, sink, stopped));
    Ok(ProbeHandle { stop, task })
}

async fn run_loop(
    prober: Prober,
    config: ProbeConfig,
    sink: Arc<dyn ProbeSink>,
    mut stopped: watch::Receiver<bool>,
) -> ProbeSummary {
    let mut tracker = Tracker::new(&prober.target().url);
    let mut ticks = tokio::time::interval(config.interval.max(Duration::from_millis(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if config
            .count
            .is_some_and(|n| tracker.summary().attempts >= n)
        {
            break;
        }
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped.changed() => break,
        }
        let attempt = tokio::select! {
            a = prober.attempt() => a,
            _ = stopped.changed() => break,
        };
        let seen = tracker.observe(&attempt);
        report(&config, &attempt, &seen);
        let write = {
            let sink = Arc::clone(&sink);
            let attempt = attempt.clone();
            tokio::task::spawn_blocking(move || sink.write_probe(&attempt))
        };
        match write.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracker.store_failed();
                tracing::warn!(error = %e, "Probe attempt not stored.");
            }
            Err(e) => {
                tracker.store_failed();
                tracing::warn!(error = %e, "Probe attempt not stored: the writer panicked.");
            }
        }
    }
    tracker.into_summary()
}

fn report(config: &ProbeConfig, attempt: &ProbeAttempt, seen: &tracker::Observation) {
    let line = status_line(attempt, seen.consecutive_failures);
    match config.status {
        StatusOutput::Stdout => {
            println!("{line}");
            if let Some(ff) = &seen.first_failure {
                println!("  -> {ff}");
            }
            if let Some(n) = seen.recovered_after {
                println!("  -> recovered after {n} failures");
            }
        }
        StatusOutput::Tracing => {
            if attempt.outcome == crate::store::ProbeOutcome::Ok {
                tracing::info!(target: "kms_collector::probe", "{line}");
            } else {
                tracing::warn!(target: "kms_collector::probe", "{line}");
            }
            if let Some(ff) = &seen.first_failure {
                tracing::warn!(target = %attempt.target, "GetMeta probe: {ff}.");
            }
            if let Some(n) = seen.recovered_after {
                tracing::info!(target = %attempt.target, failures = n, "GetMeta probe recovered.");
            }
        }
    }
}

/// Arguments of `kms-collector probe`.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// URL to probe, e.g. `https://10.0.2.2:9100/prpc/KMS.GetMeta` (a URL
    /// without a path probes `/prpc/KMS.GetMeta`). https accepts ANY server
    /// certificate (the KMS uses self-signed RA-TLS); http is plain.
    pub url: String,
    /// Time between attempt starts.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, env = "KMS_COLLECTOR_PROBE_INTERVAL")]
    pub interval: Duration,
    /// Limit of each phase of an attempt: TCP connect, TLS handshake, HTTP answer.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, env = "KMS_COLLECTOR_PROBE_TIMEOUT")]
    pub timeout: Duration,
    /// SQLite file that keeps every attempt (`probe_attempts`).
    #[arg(long, default_value = "./kms-diag.sqlite", env = "KMS_COLLECTOR_DB")]
    pub db: std::path::PathBuf,
    /// Stop after this many attempts (default: until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
    /// Offer only HTTP/1.1 (default: HTTP/2 when the server offers it). Over
    /// HTTP/1.1 each timed-out attempt leaves a CLOSE-WAIT socket in the KMS.
    #[arg(long)]
    pub http1: bool,
}

/// Runs `kms-collector probe`: polls until interrupted (or `--count`
/// attempts), one status line per attempt, then prints the summary with the
/// time to first failure.
pub async fn run(args: ProbeArgs) -> anyhow::Result<()> {
    // A bad URL should not leave a database file behind.
    Target::parse(&args.url)?;
    let sink = open_sink(&args.db)?;
    let config = ProbeConfig::new(args.url.clone())
        .interval(args.interval)
        .timeout(args.timeout)
        .count(args.count)
        .http1_only(args.http1)
        .status_output(StatusOutput::Stdout);
    println!(
        "Probing {} every {} (timeout {} per phase; any server certificate accepted), storing in {}.",
        args.url,
        humantime::format_duration(args.interval),
        humantime::format_duration(args.timeout),
        args.db.display()
    );
    let handle = spawn(config, sink).with_context(|| format!("starting to probe {}", args.url))?;
    let summary = wait(handle).await;
    println!("{summary}");
    Ok(())
}

/// Waits for the loop to end by itself, or for Ctrl-C and then stops it.
async fn wait(handle: ProbeHandle) -> ProbeSummary {
    let mut handle = handle;
    tokio::select! {
        biased;
        Ok(()) = tokio::signal::ctrl_c() => {}
        r = &mut handle.task => return r.unwrap_or_default(),
    }
    handle.stop().await
}

fn open_sink(db: &std::path::Path) -> anyhow::Result<Arc<dyn ProbeSink>> {
    let store =
        SqliteStore::open(db).with_context(|| format!("opening the store {}", db.display()))?;
    Ok(Arc::new(std::sync::Mutex::new(store)))
}
