//! `kms-lab`: the hang lab. Runs the collector, a faulted KMS twin and the
//! GetMeta poller together and shows the collector's verdict.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kms_twin::lab::cases::Case;
use kms_twin::lab::expect::judge;
use kms_twin::lab::jaeger::JaegerProcess;
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
        /// Also start a Jaeger v2 that reads the run live through the
        /// collector's remote-storage API (`serve --jaeger-storage`), print
        /// the URL to open, and keep both up after the verdict until Ctrl-C.
        #[arg(long)]
        jaeger: bool,
        /// The `jaeger` binary (github.com/jaegertracing/jaeger/cmd/jaeger v1.76.0).
        #[arg(long, env = "KMS_JAEGER_BIN", default_value = "jaeger")]
        jaeger_bin: PathBuf,
        /// Where the Jaeger UI listens.
        #[arg(long, default_value = kms_twin::lab::jaeger::DEFAULT_UI)]
        jaeger_ui: std::net::SocketAddr,
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

/// Starts Jaeger for `run --jaeger`, points the lab's collector at it and
/// prints the URL.
async fn start_jaeger(
    bin: &std::path::Path,
    ui: std::net::SocketAddr,
    config: &mut LabConfig,
) -> anyhow::Result<JaegerProcess> {
    let log = std::env::temp_dir().join(format!("kms-lab-jaeger-{}.log", std::process::id()));
    let j = JaegerProcess::start(bin, ui, &log)
        .await
        .with_context(|| format!("starting Jaeger ({}; log {})", bin.display(), log.display()))?;
    config.jaeger_storage = Some(j.storage_addr());
    eprintln!(
        "Jaeger reads this run live: {url}/search?{search}\n  (API: {url}/api/traces?{search}; Jaeger log {log})",
        url = j.url(),
        search = kms_twin::lab::jaeger::stuck_search(kms_twin::lab::jaeger::TWIN_SERVICE, "2s"),
        log = log.display(),
    );
    Ok(j)
}

/// After the verdict: serve the run's store to Jaeger until Ctrl-C.
async fn keep_serving(
    j: &JaegerProcess,
    storage: std::net::SocketAddr,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let any = "127.0.0.1:0".parse()?;
    let server = kms_collector::serve::Server::start(
        kms_collector::serve::ServerConfig::default()
            .db(dir.join(kms_twin::lab::scenario::files::DB))
            .otlp_grpc(any)
            .otlp_http(any)
            .retention(kms_collector::store::Retention::default())
            .jaeger_storage(Some(storage)),
    )
    .await
    .context("serving the run's store to Jaeger")?;
    eprintln!(
        "Jaeger still shows the run (stuck requests as their last snapshot): {}/search?{}\nCtrl-C to stop.",
        j.url(),
        kms_twin::lab::jaeger::stuck_search(kms_twin::lab::jaeger::TWIN_SERVICE, "2s")
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    server.shutdown().await.context("stopping the collector")?;
    Ok(())
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
            jaeger,
            jaeger_bin,
            jaeger_ui,
        } => {
            let mut config = common.config()?;
            let jaeger = match jaeger {
                true => Some(start_jaeger(&jaeger_bin, jaeger_ui, &mut config).await?),
                false => None,
            };
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
            if let (Some(j), Some(storage)) = (&jaeger, config.jaeger_storage) {
                keep_serving(j, storage, &result.dir).await?;
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
