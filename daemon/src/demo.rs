//! `tern demo`: a complete live migration on loopback in one process, checked byte for byte.
//!
//! It makes a mixed image in a temporary directory and a key pair for each side, starts a
//! target and a source on 127.0.0.1 over QUIC with mutual TLS, and runs a guest writer
//! (random 4–64 KiB writes at a set rate) through a `TrackedDisk` while the disk is copied.
//! When storage converges a stand-in memory pre-copy runs (the guest keeps writing, storage
//! keeps syncing), then it pauses the guest (as a VMM pauses its vCPUs), switches over
//! (final pass, flush, per-chunk digest comparison), and finally compares the two files
//! itself, independently of the engine.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;
use tern_blockdev::{BlockDevice, IoBuf, OpenOptions};
use tern_engine::compression::CompressionMode;
use tern_engine::driver::{Command, LiveHooks, incomplete_marker, serve_one};
use tern_engine::source::{LiveConfig, LiveMode};
use tern_engine::{SourceEvent, TrackedDisk};
use tern_transport::{Identity, TransportTuning, listen};
use tokio::sync::mpsc;

/// Arguments of `tern demo`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Size of the demo image.
    #[arg(long, default_value = "1G", value_parser = crate::size::parse_size)]
    size: u64,
    /// The guest's write rate in MiB/s (random 4–64 KiB writes at queue depth 1); 0 runs no
    /// guest, which makes the demo a plain copy.
    #[arg(long, default_value_t = 32.0)]
    rate: f64,
    /// Guest writer threads (the guest's queue depth); the rate is shared among them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    queue_depth: u32,
    /// Let the guest write as fast as it can (ignores --rate unless it is 0).
    #[arg(long)]
    unpaced: bool,
    /// Storage downtime budget in milliseconds: the migration converges once the predicted
    /// final sync fits in it.
    #[arg(long, default_value_t = 50)]
    max_downtime_ms: u64,
    /// The stand-in VMM's memory pre-copy, in milliseconds: after storage converged the guest
    /// keeps running (and writing) this long before it is paused, as during a real VM's RAM
    /// copy (QEMU took 110–800 ms for 256 MiB in docs/vm-migration.md); storage keeps
    /// syncing meanwhile. 0 pauses the guest at the moment storage converges (the worst
    /// case for the storage downtime: the pass that converged is still in flight).
    #[arg(long, default_value_t = 300)]
    memory_precopy_ms: u64,
    /// `auto`, when the guest dirties data faster than the link moves it, first mirrors its
    /// writes synchronously, then throttles it if that is not enough (every change is logged
    /// with its numbers); `active` mirrors every write from the start (a write completes
    /// once it is on the target); `background` only re-sends and reports that it cannot
    /// converge, then (in this demo) pauses the guest and switches over anyway.
    #[arg(long, default_value = "auto")]
    mode: LiveMode,
    /// Cap the copy's bandwidth on the wire, in MiB/s.
    #[arg(long)]
    rate_limit: Option<f64>,
    /// Compression (see `tern migrate --help`).
    #[arg(long = "compress", default_value = "auto")]
    compression: CompressionMode,
    /// Verification (see `tern migrate --help`).
    #[arg(long, default_value = "written")]
    verify: tern_engine::VerifyMode,
    /// Keep the images in this directory instead of a temporary one.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON line instead of the human summary.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct DemoSummary {
    total_s: f64,
    storage_downtime_ms: f64,
    passes: u64,
    bytes_total: u64,
    bytes_data: u64,
    bytes_resent: u64,
    bytes_wire: u64,
    guest_writes: u64,
    guest_write_mib_s: f64,
    /// `null` in JSON for an unpaced guest.
    guest_write_mib_s_intended: f64,
    /// The guest's write latency while migrating (submission to completion; in active mode
    /// a write completes only once it is on the target).
    guest_write_latency_p50_us: u32,
    guest_write_latency_p99_us: u32,
    converged_after_s: Option<f64>,
    mode_changes: u32,
    verified: bool,
    target_matches_source: bool,
}

/// The stand-in guest: random writes through the tracked disk, paced to a rate.
struct Guest {
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    writes: Arc<AtomicU64>,
    /// Each thread returns its write latencies (µs), submission to completion.
    threads: Vec<std::thread::JoinHandle<anyhow::Result<Vec<u32>>>>,
}

impl Guest {
    /// `threads` writers sharing `rate_mib_s` (`None`: as fast as they can).
    fn start(disk: TrackedDisk, rate_mib_s: Option<f64>, threads: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let writes = Arc::new(AtomicU64::new(0));
        let threads = (0..threads).map(|index| {
            let (stop, bytes, writes) = (stop.clone(), bytes.clone(), writes.clone());
            let disk = disk.clone();
            let rate_mib_s = rate_mib_s.map(|r| r / threads as f64);
            std::thread::Builder::new()
                .name(format!("demo-guest-{index}"))
                .spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(42 + index as u64);
                    let mut mine = 0u64;
                    let mut latencies = Vec::new();
                    let started = Instant::now();
                    let blocks = disk.size() / 4096;
                    while !stop.load(Ordering::Acquire) && blocks > 16 {
                        let len = rng.random_range(1..=16u64) * 4096;
                        let offset = rng.random_range(0..blocks - len / 4096) * 4096;
                        let mut data = vec![0u8; len as usize];
                        rng.fill_bytes(&mut data);
                        let submitted = Instant::now();
                        disk.write_blocking(offset, IoBuf::from_slice(&data))?;
                        latencies
                            .push(submitted.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        bytes.fetch_add(len, Ordering::Relaxed);
                        writes.fetch_add(1, Ordering::Relaxed);
                        mine += len;
                        // Pace to the rate: sleep until this many bytes are due.
                        if let Some(rate) = rate_mib_s {
                            let due =
                                Duration::from_secs_f64(mine as f64 / (rate * (1 << 20) as f64));
                            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                                std::thread::sleep(ahead);
                            }
                        }
                    }
                    Ok(latencies)
                })
                .expect("spawn a guest thread")
        });
        let threads = threads.collect();
        Self {
            stop,
            bytes,
            writes,
            threads,
        }
    }

    /// Pauses the guest: returns once its last write completed (and was marked).
    fn pause(self) -> anyhow::Result<GuestStats> {
        self.stop.store(true, Ordering::Release);
        let mut latencies = Vec::new();
        for thread in self.threads {
            latencies.extend(
                thread
                    .join()
                    .map_err(|_| anyhow::anyhow!("guest thread panicked"))??,
            );
        }
        latencies.sort_unstable();
        Ok(GuestStats {
            bytes: self.bytes.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            latencies,
            paused_at: Duration::ZERO,
        })
    }
}

/// What the guest did until it was paused.
#[derive(Debug, Default)]
struct GuestStats {
    bytes: u64,
    writes: u64,
    /// Write latencies in µs, sorted.
    latencies: Vec<u32>,
    /// When it was paused, from the demo's start.
    paused_at: Duration,
}

impl GuestStats {
    /// The `q` quantile of the write latency in µs (0 without writes).
    fn latency_us(&self, q: f64) -> u32 {
        if self.latencies.is_empty() {
            return 0;
        }
        let index = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        self.latencies[index]
    }
}

/// Pauses the guest, if there is one (as a VMM pauses its vCPUs and drains their IO), and
/// returns its bytes and writes so far and when it was paused.
async fn pause(guest: Option<Guest>, started: Instant) -> anyhow::Result<Option<GuestStats>> {
    let Some(guest) = guest else {
        return Ok(None);
    };
    let paused_at = started.elapsed();
    let mut stats = tokio::task::spawn_blocking(move || guest.pause()).await??;
    stats.paused_at = paused_at;
    Ok(Some(stats))
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let temp;
    let dir = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            temp = tempfile::tempdir().context("make a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let source_image = dir.join("source.img");
    let target_image = dir.join("target.img");
    let _ = std::fs::remove_file(&target_image);
    if !args.json {
        eprintln!(
            "tern demo: writing a {:.0} MiB mixed image (random, holes, text) to {}",
            args.size as f64 / (1 << 20) as f64,
            source_image.display()
        );
    }
    crate::gen_image::generate(
        &source_image,
        args.size,
        "random=50,hole=25,text=25",
        1,
        false,
    )?;
    let source_identity = Identity::generate("tern-demo-source")?;
    let target_identity = Identity::generate("tern-demo-target")?;

    let mut options = crate::migrate::options(args.compression, 4, args.verify);
    options.rate_limit_bytes_per_s = args.rate_limit.map(|mib| (mib * (1 << 20) as f64) as u64);
    options.config.live = Some(LiveConfig {
        max_downtime: Duration::from_millis(args.max_downtime_ms),
        mode: args.mode,
        ..LiveConfig::default()
    });
    let device = BlockDevice::open(&source_image, &OpenOptions::default())
        .with_context(|| format!("open {}", source_image.display()))?;
    let disk = TrackedDisk::new(device.clone(), options.config.chunk_bytes)
        .context("tracking granularity")?;

    // Source and target share this process: one worker each.
    let runtime = crate::migrate::runtime(2)?;
    let started = Instant::now();
    let outcome = runtime.block_on(async {
        let endpoint = listen(
            "127.0.0.1:0".parse().expect("valid address"),
            &target_identity,
            source_identity.fingerprint(),
            &TransportTuning::default(),
        )?;
        let address = endpoint.local_addr()?;
        let images = vec![target_image.clone()];
        let target = tokio::spawn(async move {
            let report = serve_one(&endpoint, &images, &OpenOptions::default()).await;
            endpoint.close(0u32.into(), b"bye");
            report
        });

        let (command_tx, command_rx) = mpsc::unbounded_channel();
        let (event_tx, mut event_rx) = mpsc::unbounded_channel();
        let pace = (!args.unpaced).then_some(args.rate);
        let guest =
            (args.rate > 0.0).then(|| Guest::start(disk.clone(), pace, args.queue_depth));
        if !args.json {
            let pace = if args.unpaced || args.rate == 0.0 {
                "as fast as it can".to_string()
            } else {
                format!("{} MiB/s", args.rate)
            };
            eprintln!(
                "tern demo: migrating over QUIC on {address} while the guest ({} writer threads) writes {pace}",
                args.queue_depth
            );
        }
        // The VMM's side: at convergence, pause the guest and switch over.
        let quiet = args.json;
        let precopy = std::time::Duration::from_millis(args.memory_precopy_ms);
        let vmm = tokio::spawn(async move {
            let mut guest = guest;
            let mut converged_at = None;
            let mut mode_changes = 0u32;
            let mut guest_result = GuestStats {
                paused_at: started.elapsed(),
                ..GuestStats::default()
            };
            while let Some(event) = event_rx.recv().await {
                match event {
                    SourceEvent::ModeChanged {
                        throttle_bytes_per_s,
                        ref reason,
                        ..
                    } => {
                        mode_changes += 1;
                        if !quiet {
                            eprintln!(
                                "tern demo: mode changed: {reason} ({:.1} MiB/s)",
                                throttle_bytes_per_s as f64 / (1 << 20) as f64
                            );
                        }
                    }
                    SourceEvent::SwitchedOver { .. } => {
                        // The VMM would finish its memory migration here, then commit.
                        let _ = command_tx.send(Command::Commit);
                    }
                    SourceEvent::BulkDone if guest.is_none() && converged_at.is_none() => {
                        // No guest: nothing will be dirtied; switch over at once.
                        converged_at = Some(started.elapsed());
                        let _ = command_tx.send(Command::Switchover);
                    }
                    SourceEvent::Converged { .. } if converged_at.is_none() => {
                        converged_at = Some(started.elapsed());
                        // The VMM copies memory now; the guest and storage carry on.
                        tokio::time::sleep(precopy).await;
                        if let Some(paused) = pause(guest.take(), started).await? {
                            guest_result = paused;
                        }
                        let _ = command_tx.send(Command::Switchover);
                    }
                    SourceEvent::NotConverging {
                        dirty_bytes,
                        dirty_rate,
                        transfer_rate,
                    } if converged_at.is_none() => {
                        // Without active mirroring (next step) the only way out is the last
                        // resort: stop the guest's writes and take the longer downtime.
                        eprintln!(
                            "tern demo: not converging ({:.1} MiB dirty, guest dirties {:.1} MiB/s, link moves {:.1} MiB/s): pausing the guest and switching over",
                            dirty_bytes as f64 / (1 << 20) as f64,
                            dirty_rate / (1 << 20) as f64,
                            transfer_rate / (1 << 20) as f64
                        );
                        converged_at = Some(started.elapsed());
                        if let Some(paused) = pause(guest.take(), started).await? {
                            guest_result = paused;
                        }
                        let _ = command_tx.send(Command::Switchover);
                    }
                    _ => {}
                }
            }
            if let Some(paused) = pause(guest.take(), started).await? {
                guest_result = paused;
            }
            anyhow::Ok((converged_at, guest_result, mode_changes))
        });
        let hooks = LiveHooks {
            bitmaps: vec![disk.bitmap().clone()],
            throttles: vec![disk.throttle().clone()],
            mirrors: vec![disk.mirror().clone()],
            bulk_devices: vec![disk.bulk_device().cloned()],
            commands: command_rx,
            events: event_tx.into(),
        };
        let copied = crate::migrate::copy(
            vec![(device.clone(), "source.img".into())],
            address,
            &source_identity,
            target_identity.fingerprint(),
            options,
            args.json,
            Some(hooks),
            // The demo's target lives in this process: nothing to reconnect to.
            &crate::migrate::LinkArgs {
                idle_timeout_s: 30.0,
                reconnect_window_s: 0.0,
                congestion: Default::default(),
            },
        )
        .await;
        let vmm = vmm.await?;
        let (summary, report) = copied?;
        let (converged_at, guest, mode_changes) = vmm?;
        target.await?.context("target failed")?;
        anyhow::Ok((summary, report, converged_at, guest, mode_changes))
    })?;
    let total = started.elapsed();
    let (summary, report, converged_at, guest, mode_changes) = outcome;
    let (guest_bytes, guest_writes, guest_time) = (guest.bytes, guest.writes, guest.paused_at);

    let equal = files_equal(&source_image, &target_image)?;
    if incomplete_marker(&target_image).exists() {
        bail!("the target image is still marked incomplete");
    }
    let progress = &report.summary.progress;
    let demo = DemoSummary {
        total_s: total.as_secs_f64(),
        storage_downtime_ms: report.downtime.unwrap_or_default().as_secs_f64() * 1e3,
        passes: progress.passes,
        bytes_total: progress.bytes_total,
        bytes_data: progress.bytes_data,
        bytes_resent: progress.bytes_resent,
        bytes_wire: summary.bytes_wire,
        guest_writes,
        guest_write_mib_s: guest_bytes as f64
            / (1 << 20) as f64
            / guest_time.as_secs_f64().max(1e-9),
        guest_write_mib_s_intended: if args.unpaced {
            f64::INFINITY
        } else {
            args.rate
        },
        guest_write_latency_p50_us: guest.latency_us(0.5),
        guest_write_latency_p99_us: guest.latency_us(0.99),
        converged_after_s: converged_at.map(|d| d.as_secs_f64()),
        mode_changes,
        verified: summary.verified,
        target_matches_source: equal,
    };
    if args.json {
        println!("{}", serde_json::to_string(&demo)?);
    } else {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "live migration of a {:.0} MiB disk on loopback QUIC",
            mib(demo.bytes_total)
        );
        println!(
            "  total {:.2} s; converged after {:.2} s; storage downtime {:.1} ms (switchover to verified handoff)",
            demo.total_s,
            demo.converged_after_s.unwrap_or_default(),
            demo.storage_downtime_ms
        );
        println!(
            "  guest: {} writes, {:.1} MiB/s achieved of {:.1} MiB/s intended while migrating; write latency p50 {} µs, p99 {} µs",
            demo.guest_writes,
            demo.guest_write_mib_s,
            demo.guest_write_mib_s_intended,
            demo.guest_write_latency_p50_us,
            demo.guest_write_latency_p99_us
        );
        println!(
            "  passes {}; mode changes {}; data {:.1} MiB, re-sent {:.1} MiB, on the wire {:.1} MiB",
            demo.passes,
            demo.mode_changes,
            mib(demo.bytes_data),
            mib(demo.bytes_resent),
            mib(demo.bytes_wire)
        );
        println!(
            "  verified: {}; independent byte-for-byte check: target {} source",
            if demo.verified { "yes" } else { "no" },
            if equal { "equals" } else { "DIFFERS FROM" }
        );
    }
    if !equal || !demo.verified {
        bail!("the target does not equal the source");
    }
    Ok(())
}

/// Compares two files byte for byte.
pub(crate) fn files_equal(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let mut a = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(a)?);
    let mut b = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(b)?);
    let mut buf_a = vec![0u8; 1 << 20];
    let mut buf_b = vec![0u8; 1 << 20];
    loop {
        let n = read_full(&mut a, &mut buf_a)?;
        let m = read_full(&mut b, &mut buf_b)?;
        if n != m || buf_a[..n] != buf_b[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
