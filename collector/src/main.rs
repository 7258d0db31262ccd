//! `kms-collector`: the host-side collector for a debug dstack KMS.

use clap::{Parser, Subcommand};

/// Receive a debug KMS's telemetry, keep it in SQLite, and say why the KMS hangs.
#[derive(Debug, Parser)]
#[command(name = "kms-collector", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Receive OTLP, store it, forward it, record tokio-console, poll GetMeta.
    Serve(Box<kms_collector::serve::ServeArgs>),
    /// Diagnose the stored data: which hypothesis (A-E) explains the hang.
    Report(kms_collector::report::ReportArgs),
    /// Export stored traces as Jaeger JSON or OTLP JSON.
    Export(kms_collector::export::ExportArgs),
    /// Poll a KMS endpoint (GetMeta) and record every attempt.
    Probe(kms_collector::probe::ProbeArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => kms_collector::serve::run(*args).await,
        Command::Report(args) => kms_collector::report::run(args).await,
        Command::Export(args) => kms_collector::export::run(args).await,
        Command::Probe(args) => kms_collector::probe::run(args).await,
    }
}
