//! `kms-collector export` (stub, to be written).

/// Arguments of `kms-collector export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {}

/// Runs `kms-collector export`.
pub async fn run(_args: ExportArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
