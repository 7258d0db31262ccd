//! `kms-collector serve` (stub, to be written).

/// Arguments of `kms-collector serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {}

/// Runs `kms-collector serve`.
pub async fn run(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
