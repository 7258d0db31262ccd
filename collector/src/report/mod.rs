//! `kms-collector report`: the diagnosis as text, JSON or one self-contained
//! HTML page.
//!
//! The library entry point is [`build_report`]; the lab embeds it:
//!
//! ```no_run
//! use kms_collector::report::{build_report, ReportOptions};
//! use kms_collector::store::SqliteReader;
//!
//! let reader = SqliteReader::open("kms-diag.sqlite")?;
//! let report = build_report(&reader, &ReportOptions::default())?;
//! println!("D: {}", report.hypotheses["D"].verdict.as_str());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

use crate::analyse::{
    analyse, fmt_time, AnalyseConfig, AnalyseError, ConnectionFindings, DeadlockFindings,
    FailureWindow, Hypothesis, LockWaitFindings, MemoryFindings, OutcomeKind, ProbeSummary,
    RejectedSender, RequestCounts, RequestFindings, ResourceFindings, StallFindings, StuckSpan,
    WaitLocation,
};
use crate::store::{ReadError, Reader, SqliteReader, TimeWindow};

mod html;
mod text;
mod timeline;

pub use html::render_html;
pub use text::render_text;
pub use timeline::{Bar, ProbePoint, Timeline};

/// Default store path of every subcommand.
pub const DEFAULT_DB: &str = "./kms-diag.sqlite";

/// Output format of `report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    /// For the terminal.
    Text,
    /// Machine-readable (the lab reads this).
    Json,
    /// One self-contained page with the verdict table and a timeline.
    Html,
}

/// Arguments of `kms-collector report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The store to read.
    #[arg(long, env = "KMS_COLLECTOR_DB", default_value = DEFAULT_DB)]
    pub db: PathBuf,
    /// Only the last DUR of the record (e.g. `10m`), counted back from the
    /// newest stored fact. Default: everything.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: ReportFormat,
    /// Write here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// What to report on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReportOptions {
    /// Only the last `since` of the record, counted back from the newest
    /// stored fact (not from now: a report on an old file reads the same).
    pub since: Option<Duration>,
    /// Thresholds of the diagnosis.
    pub config: AnalyseConfig,
}

/// Why a report could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// Reading the store failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// A diagnosis pass failed.
    #[error(transparent)]
    Analyse(#[from] AnalyseError),
}

/// The analysed window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportWindow {
    /// Start, RFC 3339.
    pub from: String,
    /// End (the newest stored fact), RFC 3339.
    pub to: String,
    /// Start, Unix ns.
    pub from_ns: i64,
    /// End, Unix ns.
    pub to_ns: i64,
    /// True when the store held nothing.
    pub empty: bool,
}

/// Per-pass findings behind the verdicts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Findings {
    /// Runtime stalls and heartbeat health.
    pub stall: StallFindings,
    /// parking_lot deadlock cycles.
    pub deadlock: DeadlockFindings,
    /// Async lock waits.
    pub lock_wait: LockWaitFindings,
    /// RSS against the limit.
    pub memory: MemoryFindings,
    /// fds and connections.
    pub connections: ConnectionFindings,
    /// The runtime's resources.
    pub resources: ResourceFindings,
    /// Request fates, cancelled requests and their wait locations.
    pub requests: RequestFindings,
}

/// The report. JSON names `hypotheses`, `stuck_spans`, `probe` and
/// `outcome` are a fixed interface; the rest extends them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// `healthy`, `explained` or `unexplained`.
    pub outcome: OutcomeKind,
    /// The outcome as one sentence (the first line of text and HTML).
    pub outcome_summary: String,
    /// Confirmed hypotheses, the cause first (e.g. `["B", "E"]`).
    pub causes: Vec<String>,
    /// Requests of the failure window by fate.
    pub requests: RequestCounts,
    /// Where hung (open or cancelled) requests wait, most first.
    pub wait_locations: Vec<WaitLocation>,
    /// Export attempts the collector refused (no or wrong token, failed TLS
    /// handshake), by sender: someone else tried to write evidence.
    pub rejected_senders: Vec<RejectedSender>,
    /// Verdicts keyed `A`..`E`.
    pub hypotheses: BTreeMap<String, Hypothesis>,
    /// Requests still open at their last snapshot, oldest first.
    pub stuck_spans: Vec<StuckSpan>,
    /// The GetMeta probe's record.
    pub probe: ProbeSummary,
    /// The analysed window.
    pub window: ReportWindow,
    /// When the KMS was failing.
    pub failure_window: Option<FailureWindow>,
    /// What each pass found.
    pub findings: Findings,
    /// Series for the timeline (downsampled).
    pub timeline: Timeline,
}

/// Diagnoses the store behind `reader`.
///
/// # Errors
///
/// [`ReportError`] when the store cannot be read. Missing data never fail a
/// report; they make verdicts inconclusive.
pub fn build_report(reader: &dyn Reader, opts: &ReportOptions) -> Result<Report, ReportError> {
    let bounds = reader.bounds()?;
    let (window, empty) = match bounds {
        Some(b) => {
            let from = match opts.since {
                Some(d) => b
                    .last_ns
                    .saturating_sub(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
                    .max(b.first_ns),
                None => b.first_ns,
            };
            (TimeWindow::new(from, b.last_ns), false)
        }
        None => (TimeWindow::new(0, 0), true),
    };
    let d = analyse(reader, &opts.config, window)?;
    let timeline = Timeline::build(&d, window);
    Ok(Report {
        outcome: d.outcome.kind,
        outcome_summary: d.outcome.summary,
        causes: d.outcome.causes,
        requests: d.requests.counts.clone(),
        wait_locations: d.requests.waits.clone(),
        rejected_senders: d.rejected_senders,
        hypotheses: d.hypotheses,
        stuck_spans: d.stuck,
        probe: d.probe,
        window: ReportWindow {
            from: fmt_time(window.from_ns),
            to: fmt_time(window.to_ns),
            from_ns: window.from_ns,
            to_ns: window.to_ns,
            empty,
        },
        failure_window: d.failure,
        findings: Findings {
            stall: d.stall,
            deadlock: d.deadlock,
            lock_wait: d.lock_wait,
            memory: d.memory,
            connections: d.connections,
            resources: d.resources,
            requests: d.requests,
        },
        timeline,
    })
}

/// The report as pretty JSON.
pub fn render_json(report: &Report) -> String {
    // Serialising plain data to a String cannot fail.
    serde_json::to_string_pretty(report).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// Runs `kms-collector report`.
pub async fn run(args: ReportArgs) -> anyhow::Result<()> {
    let reader = SqliteReader::open(&args.db)
        .with_context(|| format!("opening store {}", args.db.display()))?;
    let opts = ReportOptions {
        since: args.since,
        ..ReportOptions::default()
    };
    let report = build_report(&reader, &opts)
        .with_context(|| format!("diagnosing {}", args.db.display()))?;
    let out = match args.format {
        ReportFormat::Text => render_text(&report),
        ReportFormat::Json => render_json(&report),
        ReportFormat::Html => render_html(&report),
    };
    match args.out {
        Some(path) => std::fs::write(&path, out)
            .with_context(|| format!("writing report to {}", path.display()))?,
        None => print!("{out}"),
    }
    Ok(())
}
