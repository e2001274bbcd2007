//! `tern serve`: the target.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use tern_blockdev::OpenOptions;
use tern_engine::driver::serve_one;
use tern_transport::{Fingerprint, Identity, TransportTuning, listen};

/// Arguments of `tern serve`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Address to listen on (UDP), e.g. 0.0.0.0:4433.
    #[arg(long)]
    listen: SocketAddr,
    /// Target image: created with the source's size if missing, otherwise its size must
    /// match. Repeat for several disks, in the source's order. While the migration runs,
    /// `IMAGE.tern-incomplete` exists next to it; it is removed once the copy is verified.
    #[arg(long = "image", required = true)]
    images: Vec<PathBuf>,
    /// This host's identity directory (from `tern keygen`).
    #[arg(long)]
    identity: PathBuf,
    /// The source's certificate fingerprint; any other peer is refused during the TLS
    /// handshake.
    #[arg(long)]
    peer: Fingerprint,
    /// Async worker threads; 0 runs the transfer on one thread (see ARCHITECTURE.md).
    #[arg(long, default_value_t = 0)]
    worker_threads: usize,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let identity = Identity::load(&args.identity)
        .with_context(|| format!("load identity from {}", args.identity.display()))?;
    let runtime = crate::migrate::runtime(args.worker_threads)?;
    runtime.block_on(async {
        let endpoint = listen(args.listen, &identity, args.peer, &TransportTuning::default())
            .with_context(|| format!("listen on {}", args.listen))?;
        tracing::info!(listen = %endpoint.local_addr()?, fingerprint = %identity.fingerprint(), "waiting for the source");
        let result = serve_one(&endpoint, &args.images, &OpenOptions::default()).await;
        // Let the last frames and the close (with its reason) reach the source, bounded.
        endpoint.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle()).await;
        let report = result.context("migration failed; the target image is incomplete")?;
        tracing::info!(
            bytes_written = report.bytes_written,
            seconds = report.duration.as_secs_f64(),
            "migration complete"
        );
        Ok(())
    })
}
