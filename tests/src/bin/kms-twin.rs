//! `kms-twin`: the dstack KMS request path with injectable faults.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    kms_twin::twin::run(kms_twin::twin::TwinArgs::parse())
}
