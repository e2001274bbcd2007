//! `tern export`: the source daemon. Serves disks over NBD through `TrackedDisk` (so every
//! write a VM or client makes is tracked), and migrates them live when the control API says
//! so.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tern_blockdev::{BlockDevice, Callback, IoBuf, IoOp, OpenOptions};
use tern_engine::TrackedDisk;
use tern_engine::bitmap::GRANULARITY_DEFAULT;
use tern_engine::throttle::Throttle;
use tern_nbd::{Backend, Export, NbdAddr, NbdServer};

use crate::control::server::ControlServer;
use crate::jobs::{Disk, Jobs, Limits};

/// Arguments of `tern export`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// A disk to serve, as `NAME=PATH` or `PATH` (named after the file's stem). Repeat for
    /// several disks; the first is also the default export (the empty NBD name).
    #[arg(long = "image", required = true)]
    images: Vec<String>,
    /// Where NBD clients connect: `HOST:PORT` (TCP; QEMU: `nbd://HOST:PORT/NAME`) or
    /// `unix:PATH` (QEMU: `nbd+unix:///NAME?socket=PATH`). NBD has no authentication
    /// here: bind to loopback or a Unix socket.
    #[arg(long)]
    nbd: NbdAddr,
    /// The control socket (created with mode 0600; only this user and root may connect).
    /// Drive it with `tern ctl` / `tern status`, or any JSON-lines client.
    #[arg(long)]
    control: PathBuf,
    /// This host's identity directory (from `tern keygen`), used by `migrate` commands that
    /// name none.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (HTTP, any path).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Migrations that may run at once (each moves a set of disks to one target).
    #[arg(long, default_value_t = 4)]
    max_migrations: usize,
    /// Bandwidth shared by all migrations, bytes per second with an optional K/M/G suffix
    /// (e.g. `200M`); changeable at run time with `set-bandwidth`. Default: no cap.
    #[arg(long, value_parser = crate::size::parse_size)]
    bandwidth: Option<u64>,
    /// Page cache use for the disks: `none` opens them with O_DIRECT (like QEMU's
    /// cache=none; falls back to buffered IO where the file system refuses it), `writeback`
    /// goes through the page cache (a migration's bulk pass still reads past it, O_DIRECT,
    /// where the file system allows).
    #[arg(long, default_value = "none", value_parser = ["none", "writeback"])]
    cache: String,
    /// Async worker threads for NBD and control.
    #[arg(long, default_value_t = 2)]
    worker_threads: usize,
    /// How often running migrations report a `progress` event (and the transfer rate behind
    /// its ETA is sampled), milliseconds. The benchmark harness asks for 200 to plot the
    /// migration's course.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    progress_interval_ms: u64,
}

/// A tracked disk as an NBD backend: writes are marked dirty, and a throttled guest waits
/// on the server's runtime rather than blocking a thread.
struct TrackedBackend(TrackedDisk);

impl Backend for TrackedBackend {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn alloc_buf(&self, len: usize) -> IoBuf {
        self.0.device().alloc_buf(len)
    }
    fn submit(&self, op: IoOp, done: Callback) {
        self.0.submit_reserved(op, done)
    }
    fn reserve_write(&self, bytes: u64) -> Duration {
        self.0.reserve_write(bytes)
    }
}

/// Splits `NAME=PATH`; a bare path is named after its file stem.
pub(crate) fn parse_image(spec: &str) -> (String, PathBuf) {
    match spec.split_once('=') {
        Some((name, path)) if !name.is_empty() && !name.contains('/') => {
            (name.to_owned(), PathBuf::from(path))
        }
        _ => {
            let path = PathBuf::from(spec);
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "disk".to_owned());
            (name, path)
        }
    }
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let open = OpenOptions {
        direct: args.cache == "none",
        ..OpenOptions::default()
    };
    let mut disks = Vec::new();
    for spec in &args.images {
        let (name, path) = parse_image(spec);
        if disks.iter().any(|d: &Disk| d.name == name) {
            anyhow::bail!("two disks are named {name:?}; name them with NAME=PATH");
        }
        let device =
            BlockDevice::open(&path, &open).with_context(|| format!("open {}", path.display()))?;
        tracing::info!(disk = %name, path = %path.display(), size = device.size(), backend = ?device.kind(), direct = device.direct(), "disk opened");
        let mut tracked = TrackedDisk::new(device, GRANULARITY_DEFAULT)
            .expect("the default granularity is valid");
        if !tracked.device().direct() {
            // The guest writes through the page cache: a migration's bulk pass reads past it
            // (no copy per byte, no eviction of the host's cache), where O_DIRECT works.
            let direct = OpenOptions {
                direct: true,
                read_only: true,
                ..open.clone()
            };
            match BlockDevice::open(&path, &direct) {
                Ok(bulk) if bulk.direct() => {
                    tracing::info!(disk = %name, "bulk-pass reads bypass the page cache (O_DIRECT)");
                    tracked = tracked.with_bulk_reads_from(bulk);
                }
                Ok(_) => {
                    tracing::info!(disk = %name, "bulk-pass reads use the page cache: O_DIRECT is refused here")
                }
                Err(e) => {
                    tracing::warn!(disk = %name, error = %e, "bulk-pass reads use the page cache")
                }
            }
        }
        let export = Export::new(
            name.clone(),
            Arc::new(TrackedBackend(tracked.clone())),
            false,
        );
        disks.push(Disk {
            name,
            path: path.clone(),
            tracked,
            export,
        });
    }
    let devices: Vec<BlockDevice> = disks.iter().map(|d| d.tracked.device().clone()).collect();
    let exports: Vec<Arc<Export>> = disks.iter().map(|d| d.export.clone()).collect();
    let bandwidth = Arc::new(Throttle::new());
    bandwidth.set_rate(args.bandwidth.unwrap_or(0));
    let jobs = Jobs::new(
        disks,
        Limits {
            max_migrations: args.max_migrations.max(1),
            bandwidth,
            identity: args.identity.clone(),
        },
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let nbd = NbdServer::bind(&args.nbd, exports)
            .await
            .with_context(|| format!("listen for NBD on {}", args.nbd))?;
        let nbd_addr = nbd.local_addr();
        let control = ControlServer::bind(&args.control)
            .await
            .with_context(|| format!("bind the control socket {}", args.control.display()))?;
        let metrics = match args.metrics {
            Some(addr) => Some(
                crate::metrics::bind(addr)
                    .await
                    .with_context(|| format!("listen for metrics on {addr}"))?,
            ),
            None => None,
        };
        if let Some(listener) = &metrics {
            tracing::info!(metrics = %listener.local_addr()?, "metrics");
        }
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(nbd.run());
        tasks.spawn(control.run(jobs.clone()));
        if let Some(listener) = metrics {
            tasks.spawn(crate::metrics::serve(listener, jobs.clone()));
        }
        let ticker = jobs.clone();
        let interval = Duration::from_millis(args.progress_interval_ms);
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                ticker.tick();
            }
        });
        tracing::info!(nbd = %nbd_addr, control = %args.control.display(), "serving");
        shutdown_signal().await?;
        tracing::info!("shutting down: cancelling migrations, flushing disks");
        jobs.cancel_all().await;
        tasks.abort_all();
        for device in &devices {
            if let Err(e) = device.flush().await {
                tracing::warn!(error = %e, "flush at shutdown");
            }
        }
        Ok(())
    })
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_image;
    use std::path::PathBuf;

    #[test]
    fn images_are_named_explicitly_or_by_stem() {
        assert_eq!(
            parse_image("vda=/x/y.img"),
            ("vda".into(), PathBuf::from("/x/y.img"))
        );
        assert_eq!(
            parse_image("/x/web.img"),
            ("web".into(), PathBuf::from("/x/web.img"))
        );
        assert_eq!(
            parse_image("/x/a=b.img"),
            ("a=b".into(), PathBuf::from("/x/a=b.img"))
        );
    }
}
