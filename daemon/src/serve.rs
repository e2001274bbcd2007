//! `tern serve`: the target.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use std::sync::Arc;

use tern_blockdev::{BlockDevice, OpenOptions};
use tern_engine::driver::{OnAccepted, OnComplete, TargetHooks, serve_one_with};
use tern_nbd::proto::errno;
use tern_nbd::{Export, NbdAddr, NbdServer};
use tern_transport::{Fingerprint, Identity, TransportTuning, listen};

/// Arguments of `tern serve`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Address to listen on (UDP), e.g. 0.0.0.0:4433.
    #[arg(long)]
    listen: SocketAddr,
    /// Target image, as `PATH` or `NAME=PATH` (the name of its NBD export; default the
    /// file's stem): created with the source's size if missing, otherwise its size must
    /// match. Repeat for several disks, in the source's order. While the migration runs,
    /// `IMAGE.tern-incomplete` exists next to it; it is removed once the copy is verified.
    #[arg(long = "image", required = true)]
    images: Vec<String>,
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
    /// Also serve the image(s) over NBD here (`HOST:PORT` or `unix:PATH`; each export is
    /// named after its image's file stem, the first is also the default export). Clients
    /// may connect at once (a destination VMM starts before the migration ends): the
    /// handshake succeeds as soon as the size is known (the image exists, or the source
    /// said), but every request fails with EPERM until the migration committed. After
    /// commit the disk is served and `tern serve` keeps running until SIGTERM; after a
    /// failure or rollback it is never served and `tern serve` exits with the error.
    #[arg(long)]
    export_nbd: Option<NbdAddr>,
    /// Seconds of silence after which the QUIC connection counts as lost.
    #[arg(long, default_value_t = 30.0)]
    idle_timeout_s: f64,
    /// After a lost link, keep the session (the images and what was written) this many
    /// seconds for the source to resume it; 0 fails at once. A restarted `tern serve`
    /// resumes a session from the images' `.tern-incomplete` markers.
    #[arg(long, default_value_t = 600.0)]
    resume_window_s: f64,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let identity = Identity::load(&args.identity)
        .with_context(|| format!("load identity from {}", args.identity.display()))?;
    let (names, images): (Vec<String>, Vec<PathBuf>) = args
        .images
        .iter()
        .map(|spec| crate::export::parse_image(spec))
        .unzip();
    let runtime = crate::migrate::runtime(args.worker_threads)?;
    runtime.block_on(async {
        let exports: Vec<Arc<Export>> = names
            .iter()
            .zip(&images)
            .map(|(name, path)| {
                // A regular file's size is known now; a block device's or a missing image's
                // once the migration committed.
                let size = std::fs::metadata(path)
                    .ok()
                    .filter(|m| m.is_file())
                    .map(|m| m.len());
                Export::pending(
                    name,
                    size,
                    "tern: the migration into this disk has not committed; IO opens after commit",
                )
            })
            .collect();
        let nbd_task = match &args.export_nbd {
            Some(addr) => {
                let server = NbdServer::bind(addr, exports.clone())
                    .await
                    .with_context(|| format!("listen for NBD on {addr}"))?;
                tracing::info!(nbd = %server.local_addr(), "NBD export up; IO refused until commit");
                Some(tokio::spawn(server.run()))
            }
            None => None,
        };
        let tuning = TransportTuning {
            idle_timeout: std::time::Duration::from_secs_f64(args.idle_timeout_s.max(0.1)),
            ..TransportTuning::default()
        };
        let endpoint = listen(args.listen, &identity, args.peer, &tuning)
            .with_context(|| format!("listen on {}", args.listen))?;
        tracing::info!(listen = %endpoint.local_addr()?, fingerprint = %identity.fingerprint(), "waiting for the source");
        // At commit (images durably complete, before the source hears of it) the exports
        // open, so a destination VM resumed right after the source's commit finds its disk.
        let attached: Arc<std::sync::Mutex<Vec<BlockDevice>>> = Arc::default();
        let on_complete: Option<OnComplete> = nbd_task.as_ref().map(|_| {
            let exports = exports.clone();
            let images = images.clone();
            let attached = attached.clone();
            Arc::new(move || {
                for (path, export) in images.iter().zip(&exports) {
                    match BlockDevice::open(path, &OpenOptions::default()) {
                        Ok(device) => {
                            export.attach(Arc::new(device.clone()));
                            attached.lock().unwrap_or_else(|e| e.into_inner()).push(device);
                        }
                        Err(e) => {
                            tracing::error!(image = %path.display(), error = %e, "cannot open the committed image for NBD");
                            export.refuse(errno::EIO, format!("tern: cannot open the image: {e}"));
                        }
                    }
                }
                tracing::info!("migration committed; NBD exports open");
            }) as OnComplete
        });
        // Clients waiting in negotiation for a size learn it as soon as the source's handshake
        // is accepted (a new image, or a block device).
        let on_accepted = nbd_task.as_ref().map(|_| {
            let exports = exports.clone();
            Arc::new(move |sizes: &[u64]| {
                for (export, size) in exports.iter().zip(sizes) {
                    export.set_size(*size);
                }
            }) as OnAccepted
        });
        let hooks = TargetHooks {
            on_accepted,
            on_complete,
            resume_window: (args.resume_window_s > 0.0)
                .then(|| std::time::Duration::from_secs_f64(args.resume_window_s)),
        };
        let result = serve_one_with(&endpoint, &images, &OpenOptions::default(), hooks).await;
        // Let the last frames and the close (with its reason) reach the source, bounded.
        endpoint.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle()).await;
        let report = match result {
            Ok(report) => report,
            Err(error) => {
                for export in &exports {
                    export.refuse(errno::ESHUTDOWN, "tern: the migration failed; this image is incomplete and is not served");
                }
                if let Some(task) = nbd_task {
                    task.abort();
                }
                return Err(error).context("migration failed; the target image is incomplete");
            }
        };
        tracing::info!(
            bytes_written = report.bytes_written,
            seconds = report.duration.as_secs_f64(),
            "migration complete"
        );
        let Some(nbd_task) = nbd_task else {
            return Ok(());
        };
        // Committed: the hook opened the exports; serve until told to stop.
        let devices = std::mem::take(&mut *attached.lock().unwrap_or_else(|e| e.into_inner()));
        tracing::info!("serving the disks over NBD until SIGTERM");
        crate::export::shutdown_signal().await?;
        nbd_task.abort();
        for device in &devices {
            device.flush().await.context("flush at shutdown")?;
        }
        Ok(())
    })
}
