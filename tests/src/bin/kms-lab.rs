//! `kms-lab`: the hang lab. Runs the collector, a faulted KMS twin and the
//! GetMeta poller together and shows the collector's verdict.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kms_twin::lab::cases::Case;
use kms_twin::lab::expect::judge;
use kms_twin::lab::matrix::{render_table, run_matrix};
use kms_twin::lab::scenario::{run_case, LabConfig};

/// Reproduce a KMS hang of each kind and show what the collector concludes.
#[derive(Debug, Parser)]
#[command(name = "kms-lab", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One case: warm up, inject, wait for the hang and a stable report, print it.
    Run {
        /// The case: a fault's name (none, pccs-hang, webhook-hang, ...,
        /// see the crate docs), bursty-load or collector-first.
        #[arg(long, alias = "case")]
        fault: Case,
        /// Keep the database there, with the HTML report and the Jaeger export.
        #[arg(long)]
        keep: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
        /// Print the JSON report instead of the text one.
        #[arg(long)]
        json: bool,
    },
    /// Every case, then a table of verdicts; exits non-zero if any row is wrong.
    Matrix {
        /// Runs at the same time (each is a collector, a twin and its load).
        #[arg(long, default_value_t = 4, env = "KMS_LAB_JOBS")]
        jobs: usize,
        /// Keep one directory per case there.
        #[arg(long)]
        keep: Option<PathBuf>,
        /// Only these cases (comma-separated).
        #[arg(long, value_delimiter = ',')]
        only: Vec<Case>,
        #[command(flatten)]
        common: Common,
    },
    /// Run the KMS twin itself (what `run` and `matrix` start as a child).
    #[command(hide = true)]
    Twin(kms_twin::twin::TwinArgs),
}

#[derive(Debug, clap::Args)]
struct Common {
    /// Time between GetMeta probes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    probe_interval: Duration,
    /// Worker threads of the twin's runtime.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Run this kms-twin binary (default: this binary's hidden `twin` subcommand).
    #[arg(long, env = "KMS_TWIN_BIN")]
    twin: Option<PathBuf>,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

impl Common {
    fn config(&self) -> anyhow::Result<LabConfig> {
        let (twin_binary, twin_subcommand) = match &self.twin {
            Some(path) => (path.clone(), Vec::new()),
            None => (
                std::env::current_exe().context("finding kms-lab's own binary")?,
                vec!["twin".into()],
            ),
        };
        Ok(LabConfig {
            twin_binary,
            twin_subcommand,
            workers: self.workers,
            probe_interval: self.probe_interval,
            progress: !self.quiet,
            ..LabConfig::default()
        })
    }
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    if let Command::Twin(args) = cli.command {
        // The twin builds its own runtime and installs its own subscriber.
        kms_twin::twin::run_as(args, vec!["twin".into()])?;
        return Ok(ExitCode::SUCCESS);
    }
    tracing_init();
    tokio::runtime::Runtime::new()
        .context("starting the lab's runtime")?
        .block_on(lab(cli.command))
}

async fn lab(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run {
            fault,
            keep,
            common,
            json,
        } => {
            let config = common.config()?;
            let result = run_case(&fault, &config, keep.as_deref())
                .await
                .with_context(|| format!("running the lab case {fault}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&result.report)?);
            } else {
                println!("{}", result.report_text);
                let j = judge(&fault, &result.report);
                println!(
                    "case {fault}: expected {}; outcome {}; D {}; confirmed {}; {}",
                    j.expected,
                    j.outcome,
                    j.d_verdict,
                    if j.confirmed.is_empty() {
                        "nothing".to_owned()
                    } else {
                        j.confirmed.join(",")
                    },
                    if j.ok() {
                        "as expected".to_owned()
                    } else {
                        format!("NOT as expected: {}", j.problems.join("; "))
                    }
                );
                if let Some(dir) = &keep {
                    println!("kept in {}", dir.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Matrix {
            jobs,
            keep,
            only,
            common,
        } => {
            let config = common.config()?;
            let cases = if only.is_empty() {
                Case::ALL.to_vec()
            } else {
                only
            };
            let rows = run_matrix(&cases, &config, jobs, keep.as_deref()).await;
            print!("{}", render_table(&rows));
            Ok(if rows.iter().all(|r| r.ok()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Twin(_) => unreachable_twin(),
    }
}

/// `main` runs the twin subcommand before starting the lab.
fn unreachable_twin() -> anyhow::Result<ExitCode> {
    anyhow::bail!("the twin subcommand runs outside the lab's runtime")
}

/// Warnings and errors of the in-process collector on stderr.
fn tracing_init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}
