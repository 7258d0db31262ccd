//! `kms-collector probe` (stub, to be written).

/// Arguments of `kms-collector probe`.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {}

/// Runs `kms-collector probe`.
pub async fn run(_args: ProbeArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
