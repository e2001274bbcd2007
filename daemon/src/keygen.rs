//! `tern keygen`.

use std::path::PathBuf;

use anyhow::Context;
use tern_transport::Identity;

/// Arguments of `tern keygen`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Directory for `cert.pem` and `key.pem` (the key is written with mode 0600).
    #[arg(long)]
    out: PathBuf,
    /// Name put in the certificate.
    #[arg(long, default_value = "tern")]
    name: String,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let identity = Identity::generate(&args.name).context("generate key")?;
    identity
        .save(&args.out)
        .with_context(|| format!("save identity to {}", args.out.display()))?;
    println!("{}", identity.fingerprint());
    Ok(())
}
