//! `tern migrate`: the source.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tern_blockdev::{BlockDevice, OpenOptions};
use tern_engine::compression::CompressionMode;
use tern_engine::driver::{LiveHooks, Reconnect, SourceOptions, SourceReport, run_source};
use tern_engine::{SourceConfig, SourceProgress, VerifyMode};
use tern_transport::{Fingerprint, Identity, TransportTuning, connect};
use tokio::sync::watch;

/// Arguments of `tern migrate`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Source image (raw file or block device); repeat for the several disks of one VM, in the
    /// order the target lists its images. Not used with `--control`.
    #[arg(
        long = "image",
        required_unless_present = "control",
        conflicts_with = "control"
    )]
    images: Vec<PathBuf>,
    /// Migrate the disks a running `tern export` serves, through its control socket, while
    /// its NBD clients keep writing: starts the migration, shows its progress, and at
    /// convergence switches over (quiescing the NBD clients) and commits. `--identity`
    /// defaults to the daemon's.
    #[arg(long, value_name = "SOCKET")]
    control: Option<PathBuf>,
    /// With `--control`: the disks to migrate, by name (repeat); default every disk the
    /// daemon serves that no other migration holds.
    #[arg(long = "disk", requires = "control")]
    disks: Vec<String>,
    /// With `--control`: stop at convergence and leave switchover and commit to the
    /// operator (`tern ctl SOCKET switchover commit=true`).
    #[arg(long, requires = "control")]
    no_switchover: bool,
    /// With `--control`: `auto` (mirror, then throttle, a guest that outruns the link),
    /// `active` (mirror every write from the start) or `background`.
    #[arg(long, requires = "control")]
    mode: Option<String>,
    /// With `--control`: the storage downtime budget in milliseconds.
    #[arg(long, requires = "control")]
    max_downtime_ms: Option<u64>,
    /// Target address (where `tern serve --listen` runs), e.g. 192.0.2.7:4433.
    #[arg(long)]
    to: SocketAddr,
    /// This host's identity directory (from `tern keygen`).
    #[arg(long, required_unless_present = "control")]
    identity: Option<PathBuf>,
    /// The target's certificate fingerprint (printed by its `tern keygen`).
    #[arg(long)]
    peer: Fingerprint,
    /// Compression: `auto` compresses while the link is the bottleneck and stops while the
    /// CPU is; `zstd` always compresses (level 1, raw when it saves < 10 %); `off` never.
    #[arg(long = "compress", default_value = "auto")]
    compression: CompressionMode,
    /// Print one JSON summary line on stdout instead of the human summary.
    #[arg(long)]
    json: bool,
    /// How the copy is checked: `written` compares per-chunk digests of what the source read
    /// and what the target handed to its disk (no extra IO); `read-back` makes the target read
    /// its whole image back after the final flush (checks the disk too, costs a full read);
    /// `off` skips the check (`verified` is then false).
    #[arg(long, default_value = "written")]
    verify: VerifyMode,
    /// Async worker threads; 0 runs the transfer on one thread (see ARCHITECTURE.md).
    #[arg(long, default_value_t = 0)]
    worker_threads: usize,
    /// Cap the copy's bandwidth on the wire, in MiB/s (all streams together).
    #[arg(long)]
    rate_limit: Option<f64>,
    /// QUIC data streams.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    streams: u16,
    #[command(flatten)]
    link: LinkArgs,
}

/// How a source treats its link (shared by `migrate` and `demo`).
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct LinkArgs {
    /// Seconds of silence after which the QUIC connection counts as lost (keep-alives go
    /// every quarter of it).
    #[arg(long, default_value_t = 30.0)]
    pub(crate) idle_timeout_s: f64,
    /// After a lost link, keep reconnecting this many seconds and resume the session (only
    /// what the target never confirmed durable is sent again); 0 fails at once.
    #[arg(long, default_value_t = 60.0)]
    pub(crate) reconnect_window_s: f64,
    /// QUIC congestion control of the data sent: `cubic` (default) or `bbr` (quinn's,
    /// experimental there; much faster on long links with random loss).
    #[arg(long, default_value = "cubic")]
    pub(crate) congestion: tern_transport::Congestion,
}

impl LinkArgs {
    pub(crate) fn tuning(&self) -> TransportTuning {
        TransportTuning {
            idle_timeout: Duration::from_secs_f64(self.idle_timeout_s.max(0.1)),
            congestion: self.congestion,
            ..TransportTuning::default()
        }
    }

    pub(crate) fn reconnect_window(&self) -> Option<Duration> {
        (self.reconnect_window_s > 0.0).then(|| Duration::from_secs_f64(self.reconnect_window_s))
    }
}

/// The `--json` summary; these keys are a stable interface.
#[derive(Serialize, Debug)]
pub(crate) struct Summary {
    pub(crate) bytes_total: u64,
    pub(crate) bytes_data: u64,
    pub(crate) bytes_wire: u64,
    pub(crate) duration_s: f64,
    pub(crate) throughput_mib_s: f64,
    pub(crate) verified: bool,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    if let Some(socket) = &args.control {
        let mut arguments = serde_json::json!({
            "target": args.to.to_string(),
            "peer": args.peer.to_string(),
            "compress": args.compression.to_string(),
            "verify": args.verify.to_string(),
        });
        if let Some(identity) = &args.identity {
            arguments["identity"] = identity.display().to_string().into();
        }
        if !args.disks.is_empty() {
            arguments["disks"] = args.disks.clone().into();
        }
        if let Some(mode) = &args.mode {
            arguments["mode"] = mode.clone().into();
        }
        if let Some(ms) = args.max_downtime_ms {
            arguments["max-downtime-ms"] = ms.into();
        }
        if let Some(mib) = args.rate_limit {
            arguments["rate-limit"] = ((mib * (1 << 20) as f64) as u64).into();
        }
        return crate::control::client::migrate(socket, arguments, !args.no_switchover, args.json);
    }
    let identity_dir = args
        .identity
        .as_ref()
        .expect("clap requires --identity without --control");
    let identity = Identity::load(identity_dir)
        .with_context(|| format!("load identity from {}", identity_dir.display()))?;
    let mut options = options(args.compression, args.streams, args.verify);
    options.rate_limit_bytes_per_s = args.rate_limit.map(|mib| (mib * (1 << 20) as f64) as u64);
    let runtime = runtime(args.worker_threads)?;
    let disks = open_images(&args.images)?;
    // A run interrupted by a crash left a session record: the same command resumes it.
    let (session_id, restarted) =
        crate::session::begin(&args.images, &args.to.to_string(), &args.peer.to_string())?;
    options.config.session_id = session_id;
    options.config.restarted = restarted;
    let result = runtime.block_on(copy(
        disks, args.to, &identity, args.peer, options, args.json, None, &args.link,
    ));
    let (summary, _) = match result {
        Ok(done) => done,
        Err(error) => {
            tracing::warn!(
                "the session record is kept: running the same command again resumes the copy"
            );
            return Err(error);
        }
    };
    crate::session::end(&args.images);
    print_summary(&summary, args.json)
}

/// The async runtime: one thread (the default) or `worker_threads` workers.
///
/// One thread per side is the measured optimum for one QUIC connection (quinn's per-packet
/// work does not parallelise, and a single thread avoids cross-thread wake-ups): on the
/// 2-core reference machine a 1 GiB copy ran at 830 MiB/s against 700–750 MiB/s with a
/// multi-thread runtime. More workers help when compression, not the connection, is the
/// CPU bottleneck.
pub(crate) fn runtime(worker_threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if worker_threads == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(worker_threads);
        builder
    };
    builder
        .enable_all()
        .thread_name("tern")
        .build()
        .context("start async runtime")
}

pub(crate) fn options(
    compression: CompressionMode,
    streams: u16,
    verify: VerifyMode,
) -> SourceOptions {
    let mut session_id = [0u8; 16];
    rand::fill(&mut session_id);
    SourceOptions {
        config: SourceConfig {
            data_streams: streams,
            verify,
            session_id,
            ..SourceConfig::default()
        },
        compression,
        rate_limit_bytes_per_s: None,
        shared_rate_limit: None,
        reconnect: None,
    }
}

pub(crate) fn identity_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Opens the source images read-only.
pub(crate) fn open_images(images: &[PathBuf]) -> anyhow::Result<Vec<(BlockDevice, String)>> {
    let mut disks = Vec::new();
    for image in images {
        let open = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        let device = BlockDevice::open(image, &open)
            .with_context(|| format!("open source image {}", image.display()))?;
        tracing::info!(image = %image.display(), backend = %device.kind(), direct = device.direct(), "source image open");
        disks.push((device, identity_of(image)));
    }
    Ok(disks)
}

/// Migrates `disks` to the target at `to`; returns the summary and the engine's report.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn copy(
    disks: Vec<(BlockDevice, String)>,
    to: SocketAddr,
    identity: &Identity,
    peer: Fingerprint,
    mut options: SourceOptions,
    quiet: bool,
    live: Option<LiveHooks>,
    link: &LinkArgs,
) -> anyhow::Result<(Summary, SourceReport)> {
    let bytes_total: u64 = disks.iter().map(|(d, _)| d.size()).sum();
    let tuning = link.tuning();
    let (endpoint, connection) = connect(to, identity, peer, &tuning)
        .await
        .with_context(|| format!("connect to target {to}"))?;
    if let Some(window) = link.reconnect_window() {
        options.reconnect = Some(Reconnect::to(
            endpoint.clone(),
            to,
            identity,
            peer,
            &tuning,
            window,
        )?);
    }
    let (progress_tx, progress_rx) = watch::channel(SourceProgress {
        bytes_total,
        ..Default::default()
    });
    let bar = crate::progress::spawn(progress_rx, quiet);
    let result = run_source(&connection, disks, options, Some(progress_tx), live).await;
    if let Some(bar) = bar {
        let _ = bar.await;
    }
    connection.close(0u32.into(), b"done");
    // Wait for the close to reach the target, bounded: a vanished target must not hang us.
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    let report = result.context("migration failed; the source image is unchanged")?;
    let seconds = report.duration.as_secs_f64();
    let summary = Summary {
        bytes_total: report.summary.progress.bytes_total,
        bytes_data: report.summary.progress.bytes_data,
        bytes_wire: report.bytes_wire,
        duration_s: seconds,
        throughput_mib_s: report.summary.progress.bytes_total as f64
            / (1 << 20) as f64
            / seconds.max(1e-9),
        verified: report.summary.verified,
    };
    Ok((summary, report))
}

pub(crate) fn print_summary(summary: &Summary, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(summary)?);
    } else {
        println!(
            "copied {:.1} MiB in {:.2} s ({:.0} MiB/s): {:.1} MiB of data, {:.1} MiB on the wire, verified: {}",
            summary.bytes_total as f64 / (1 << 20) as f64,
            summary.duration_s,
            summary.throughput_mib_s,
            summary.bytes_data as f64 / (1 << 20) as f64,
            summary.bytes_wire as f64 / (1 << 20) as f64,
            if summary.verified { "yes" } else { "no" },
        );
    }
    Ok(())
}
