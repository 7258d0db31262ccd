//! `kms-collector report` (stub, to be written).

/// Arguments of `kms-collector report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {}

/// Runs `kms-collector report`.
pub async fn run(_args: ReportArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
