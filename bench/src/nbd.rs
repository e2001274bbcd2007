//! The NBD scenario: a live migration through the daemon's NBD export with a real NBD client
//! writing. Per repetition, `tern serve --export-nbd` (target) and `tern export` (source)
//! run as separate processes, `fio --ioengine=nbd` writes random blocks through the source's
//! export, and `tern ctl` drives the migration step by step: `migrate`, `wait converged`,
//! two more seconds of guest writes, the guest stopped (as a VMM pauses a VM), then
//! `switchover commit=true`. The guest's write rate and latency come from fio's per-IO latency
//! log, split into the window before the migration and the window until convergence.
//!
//! This mirrors the QEMU method of `../shared/README.md` (the VM pauses 2 s after READY);
//! `--peer qemu` runs that method too, with the same guest, after every Tern repetition
//! (see [`crate::qemu`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::copy::{Identity, MIX, default_tern, keygen, remove_target};
use crate::process::{self, Guard, LineWatcher, run_timed};
use crate::qemu;
use crate::report::opt;
use crate::stats::{Summary, percentile, summarize};

/// Bound on `tern gen-image` and `qemu-img compare` of one image.
const LONG_TIMEOUT: Duration = Duration::from_secs(3600);
/// Bound on a daemon getting ready.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one `tern ctl` command other than `wait`.
const CTL_TIMEOUT: Duration = Duration::from_secs(120);
/// `tern ctl wait converged --timeout`, seconds.
pub(crate) const CONVERGE_TIMEOUT_S: u64 = 600;
/// Bound on fio exiting after SIGINT (it writes its logs and its JSON first).
pub(crate) const FIO_EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on a daemon exiting after SIGTERM (it flushes its disks first).
pub(crate) const DAEMON_EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the guest writes before the migration starts (the "before" window).
pub(crate) const BASELINE: Duration = Duration::from_secs(2);
/// How long the guest keeps writing after convergence before it is stopped.
pub(crate) const AFTER_CONVERGED: Duration = Duration::from_secs(2);
/// The `tern serve` log line that says it listens.
const SERVE_READY: &str = "waiting for the source";
/// The `tern export` log line that says its NBD and control sockets are up.
const EXPORT_READY: &str = "serving";
/// The export name both daemons give the disk.
pub(crate) const DISK: &str = "disk";
/// `--write_lat_log` prefix; fio appends `_lat.log`, `_clat.log` and `_slat.log`.
const LAT_PREFIX: &str = "lat";
/// The log with the total latency of each IO (submission to completion), in ns.
const LAT_LOG: &str = "lat_lat.log";

/// Arguments of `tern-bench nbd`.
#[derive(clap::Args, Debug)]
pub(crate) struct NbdArgs {
    /// Repetitions.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
    /// Image size, as `tern gen-image --size` takes it (e.g. 2G, 256M).
    #[arg(long, default_value = "2G")]
    size: String,
    /// The guest's write rate, MiB/s (fio `--rate`); ignored with `--unpaced`.
    #[arg(long, default_value_t = 32.0)]
    rate: f64,
    /// The guest's queue depth (fio `--iodepth`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    queue_depth: u32,
    /// Write as fast as the export accepts (no fio `--rate`).
    #[arg(long)]
    unpaced: bool,
    /// The migration's mode (`migrate mode=`).
    #[arg(long, default_value = "auto", value_parser = ["auto", "background"])]
    mode: String,
    /// Storage downtime budget (`migrate max-downtime-ms=`).
    #[arg(long, default_value_t = 50)]
    max_downtime_ms: u64,
    /// Page cache use of the source daemon (`tern export --cache`).
    #[arg(long, default_value = "writeback", value_parser = ["none", "writeback"])]
    pub(crate) cache: String,
    /// Also run the same guest against QEMU's mirror (`qemu-storage-daemon` source and target,
    /// `blockdev-mirror` driven over QMP), in copy modes `background` and `write-blocking`,
    /// interleaved with Tern in every repetition; writes `nbd-CASE-vs-qemu.md` and `.json`.
    #[arg(long, value_parser = ["qemu"])]
    peer: Option<String>,
    /// Page cache use of QEMU's target image (`none`: cache.direct=on, like `tern serve`'s
    /// O_DIRECT target; `writeback`: cache.direct=off). QEMU's source follows `--cache`.
    #[arg(long, default_value = "none", value_parser = ["none", "writeback"])]
    pub(crate) qemu_target_cache: String,
    /// Scratch directory for images, identities, sockets and fio's logs (not tmpfs: the
    /// target uses O_DIRECT).
    #[arg(long, default_value = "tern-bench-work")]
    dir: PathBuf,
    /// Directory for the report (`nbd-CASE.md`, also printed) and the raw runs
    /// (`nbd-CASE.json`); CASE names the queue depth, rate and mode.
    #[arg(long, default_value = ".")]
    pub(crate) out: PathBuf,
    /// The `tern` binary; by default the one next to this binary, else `tern` on PATH.
    #[arg(long)]
    tern: Option<PathBuf>,
    /// Keep fio's latency log and JSON of each repetition in the scratch directory
    /// (`rep-N-lat_lat.log`, `rep-N-fio.json`).
    #[arg(long)]
    keep_logs: bool,
}

impl NbdArgs {
    /// The guest's intended rate in MiB/s, `None` when unpaced.
    pub(crate) fn intended(&self) -> Option<f64> {
        (!self.unpaced).then_some(self.rate)
    }

    /// A short name of the case, used in file names.
    pub(crate) fn case_name(&self) -> String {
        let rate = match self.intended() {
            Some(rate) => format!("{rate}mibs"),
            None => "unpaced".to_owned(),
        };
        format!("qd{}-{rate}-{}", self.queue_depth, self.mode)
    }
}

/// The set-up of one `tern-bench nbd` invocation, as recorded in the JSON.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct NbdConfig {
    /// Virtual size of the image in bytes.
    pub(crate) size_bytes: u64,
    /// Repetitions.
    pub(crate) reps: u32,
    /// `tern gen-image --mix` (the seed is the repetition number).
    pub(crate) mix: String,
    /// The guest's intended rate, MiB/s (`None`: unpaced).
    pub(crate) rate_mib_s: Option<f64>,
    /// fio `--iodepth`.
    pub(crate) queue_depth: u32,
    /// `migrate mode=`.
    pub(crate) mode: String,
    /// `migrate max-downtime-ms=`.
    pub(crate) max_downtime_ms: u64,
    /// `tern export --cache`.
    pub(crate) cache: String,
    /// The guest's command line (DIR stands for the scratch directory).
    pub(crate) fio_cmd: String,
    /// `fio --version`.
    pub(crate) fio_version: String,
    /// The tern binary used.
    pub(crate) tern: String,
}

/// Write throughput and latency of the guest in one time window, from fio's latency log.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Window {
    /// Length of the window, seconds.
    pub(crate) seconds: f64,
    /// Writes that completed in the window.
    pub(crate) writes: usize,
    /// MiB written by those writes, per second of the window.
    pub(crate) mib_s: f64,
    /// Median total write latency (submission to completion), µs.
    pub(crate) p50_us: Option<f64>,
    /// 99th percentile of the total write latency, µs.
    pub(crate) p99_us: Option<f64>,
}

/// One completed IO from fio's latency log.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    /// Completion time, milliseconds since the Unix epoch (`--log_unix_epoch=1`).
    time_ms: f64,
    /// Total latency, nanoseconds.
    latency_ns: f64,
    /// Block size, bytes.
    bytes: u64,
}

/// One repetition.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct RunRecord {
    /// Repetition, from 1 (also the image's seed).
    pub(crate) rep: u32,
    /// Whether the page cache was dropped before the daemons started.
    pub(crate) caches_dropped: bool,
    /// From `migrate` to the end of the commit, as the daemon measures it (`total-time-s`);
    /// includes the 2 s the guest keeps writing after convergence and stopping it.
    pub(crate) total_s: f64,
    /// From just before `tern ctl migrate` to the return of `tern ctl wait converged`.
    pub(crate) converge_s: f64,
    /// Storage downtime reported by `switchover` (hold → verified handoff).
    pub(crate) downtime_ms: f64,
    /// Whether the per-chunk digests matched (`switchover`'s `verified`).
    pub(crate) verified: bool,
    /// Virtual size migrated.
    pub(crate) bytes_total: u64,
    /// Bytes sent over QUIC, after compression.
    pub(crate) bytes_wire: u64,
    /// Bytes sent again because the guest dirtied them.
    pub(crate) bytes_resent: u64,
    /// Passes over the dirty bitmap.
    pub(crate) passes: u64,
    /// The guest from its first write to the `migrate` command.
    pub(crate) before: Window,
    /// The guest from the `migrate` command to convergence.
    pub(crate) during: Window,
    /// `during.mib_s` / intended rate (paced guests only).
    pub(crate) during_vs_intended: Option<f64>,
    /// `during.mib_s` / `before.mib_s`.
    pub(crate) during_vs_before: Option<f64>,
    /// Bytes fio wrote in the whole run (its JSON), a cross-check of the log.
    pub(crate) fio_bytes_written: u64,
    /// The guest's write rate in each second from its first write to its stop, MiB/s
    /// (second 0 starts at the first write).
    pub(crate) timeline_mib_s: Vec<f64>,
    /// When the `migrate` command was sent, seconds after the guest's first write.
    pub(crate) migrate_at_s: f64,
    /// The engine's `mode-changed` events (auto mode throttling the guest).
    mode_changes: Vec<ModeChange>,
    /// How long holding the NBD clients took at switchover (`switched-over` event), ms.
    pub(crate) quiesce_ms: Option<f64>,
    /// `qemu-img compare` found the target equal to the source.
    pub(crate) target_equal: bool,
}

/// A `mode-changed` event: auto mode limited the guest's writes.
#[derive(Clone, Debug, PartialEq, Serialize)]
struct ModeChange {
    /// Seconds after the `migrate` command.
    at_s: f64,
    /// The new write limit, MiB/s.
    throttle_mib_s: f64,
    /// The transfer rate the engine measured, MiB/s.
    transfer_mib_s: f64,
    /// The rate at which the guest dirtied data, MiB/s.
    dirty_mib_s: f64,
    /// The engine's reason.
    reason: String,
}

/// One summarised quantity of all repetitions.
#[derive(Clone, Debug, Serialize)]
struct Metric {
    /// What it is, with its unit.
    name: &'static str,
    /// Median, min and max (`None` if no run had it).
    summary: Option<Summary>,
    /// Decimals shown in the report.
    #[serde(skip)]
    digits: usize,
}

/// Runs the scenario `reps` times and writes the report and the JSON.
pub(crate) fn run(args: &NbdArgs) -> anyhow::Result<()> {
    let tern = args.tern.clone().unwrap_or_else(default_tern);
    fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let dir = args.dir.canonicalize()?;
    let fio_version = run_timed(
        "fio --version",
        Command::new("fio").arg("--version"),
        Duration::from_secs(10),
    )?
    .check("fio --version (install fio)")?
    .stdout
    .trim()
    .to_owned();
    let source_id = keygen(&tern, &dir.join("nbd-src-id"))?;
    let target_id = keygen(&tern, &dir.join("nbd-dst-id"))?;
    let bench = Bench {
        tern: tern.clone(),
        dir: dir.clone(),
        args,
        source_id,
        target_id,
    };
    let mut runs = Vec::new();
    let mut peer_runs = Vec::new();
    let mut size_bytes = 0;
    for rep in 1..=args.reps {
        eprintln!(
            "tern-bench: nbd {}: repetition {rep}/{}",
            args.case_name(),
            args.reps
        );
        let (record, size) = bench.run_one(rep)?;
        size_bytes = size;
        eprintln!(
            "tern-bench:   total {:.2} s, converged after {:.2} s, downtime {:.1} ms, guest {:.1} → {:.1} MiB/s, p99 {} → {} µs, re-sent {:.0} MiB, verified {}",
            record.total_s,
            record.converge_s,
            record.downtime_ms,
            record.before.mib_s,
            record.during.mib_s,
            opt(record.before.p99_us, 0),
            opt(record.during.p99_us, 0),
            mib(record.bytes_resent),
            record.verified
        );
        runs.push(record);
        if args.peer.is_some() {
            for mode in qemu::MODES {
                eprintln!(
                    "tern-bench: nbd {}: QEMU mirror ({mode}), repetition {rep}/{}",
                    args.case_name(),
                    args.reps
                );
                let record = qemu::run_one(&bench, rep, mode)?;
                eprintln!(
                    "tern-bench:   total {:.2} s, ready after {:.2} s, downtime {:.1} ms, guest {:.1} → {:.1} MiB/s, p99 {} → {} µs, identical {}",
                    record.total_s,
                    record.converge_s,
                    record.downtime_ms,
                    record.before.mib_s,
                    record.during.mib_s,
                    opt(record.before.p99_us, 0),
                    opt(record.during.p99_us, 0),
                    record.target_equal
                );
                peer_runs.push(record);
            }
        }
    }
    let config = NbdConfig {
        size_bytes,
        reps: args.reps,
        mix: MIX.to_owned(),
        rate_mib_s: args.intended(),
        queue_depth: args.queue_depth,
        mode: args.mode.clone(),
        max_downtime_ms: args.max_downtime_ms,
        cache: args.cache.clone(),
        fio_cmd: fio_command_line(args, Path::new("DIR"), size_bytes),
        fio_version,
        tern: tern.display().to_string(),
    };
    let metrics = summarize_runs(&runs);
    let report = render(&config, &runs, &metrics);
    let stem = format!("nbd-{}", args.case_name());
    let json_path = args.out.join(format!("{stem}.json"));
    let report_path = args.out.join(format!("{stem}.md"));
    let json = serde_json::json!({
        "scenario": "nbd",
        "config": config,
        "runs": runs,
        "summary": metrics,
    });
    fs::write(&json_path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("write {}", json_path.display()))?;
    fs::write(&report_path, &report).with_context(|| format!("write {}", report_path.display()))?;
    print!("{report}");
    eprintln!(
        "tern-bench: wrote {} and {}",
        report_path.display(),
        json_path.display()
    );
    if args.peer.is_some() {
        qemu::report(args, &config, &runs, &peer_runs)?;
    }
    Ok(())
}

/// fio's arguments for the guest (without the program name).
fn fio_args(args: &NbdArgs, dir: &Path, size_bytes: u64) -> Vec<String> {
    let mut fio = vec![
        "--name=guest".to_owned(),
        "--ioengine=nbd".to_owned(),
        format!(
            "--uri=nbd+unix:///{DISK}?socket={}",
            dir.join("src.nbd").display()
        ),
        "--rw=randwrite".to_owned(),
        "--bsrange=4k-64k".to_owned(),
        format!("--iodepth={}", args.queue_depth),
    ];
    if let Some(rate) = args.intended() {
        // In KiB/s, so that a fractional MiB/s rate is exact enough.
        fio.push(format!("--rate={}k", (rate * 1024.0).round() as u64));
    }
    fio.extend([
        format!("--size={size_bytes}"),
        "--time_based".to_owned(),
        "--runtime=3600".to_owned(),
        format!("--write_lat_log={}", dir.join(LAT_PREFIX).display()),
        "--log_avg_msec=0".to_owned(),
        "--per_job_logs=0".to_owned(),
        // Wall-clock timestamps, so that the log lines up with the migration's steps.
        "--log_unix_epoch=1".to_owned(),
        "--output-format=json".to_owned(),
        format!("--output={}", dir.join("fio.json").display()),
    ]);
    fio
}

/// The guest's command line as one string, for the report.
fn fio_command_line(args: &NbdArgs, dir: &Path, size_bytes: u64) -> String {
    let mut line = "fio".to_owned();
    for arg in fio_args(args, dir, size_bytes) {
        line.push(' ');
        line.push_str(&arg);
    }
    line
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        * 1e3
}

/// Bytes in MiB.
pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Shared state of the repetitions.
pub(crate) struct Bench<'a> {
    /// The `tern` binary.
    tern: PathBuf,
    /// Scratch directory (absolute).
    pub(crate) dir: PathBuf,
    /// The options.
    pub(crate) args: &'a NbdArgs,
    /// The source daemon's identity.
    source_id: Identity,
    /// The target's identity.
    target_id: Identity,
}

impl Bench<'_> {
    /// A `tern` command with plain-text logs.
    fn tern(&self) -> Command {
        let mut cmd = Command::new(&self.tern);
        cmd.env("NO_COLOR", "1").args(["--log-format", "text"]);
        cmd
    }

    /// `tern ctl CONTROL ARGS...`; returns its stdout.
    fn ctl(&self, control: &Path, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let what = format!("tern ctl {}", args.join(" "));
        let done = run_timed(
            &what,
            self.tern().arg("ctl").arg(control).args(args),
            timeout,
        )?
        .check(&what)?;
        Ok(done.stdout)
    }

    /// Removes the scratch files of one repetition.
    pub(crate) fn clean(&self) -> anyhow::Result<()> {
        for name in [
            "src.img", "src.nbd", "dst.nbd", "ctl.sock", "fio.json", "src.qmp", "dst.qmp",
        ] {
            remove_target(&self.dir.join(name))?;
        }
        for suffix in ["lat", "clat", "slat"] {
            remove_target(&self.dir.join(format!("{LAT_PREFIX}_{suffix}.log")))?;
        }
        remove_target(&self.dir.join("dst.img"))
    }

    /// One repetition; returns its record and the image size.
    fn run_one(&self, rep: u32) -> anyhow::Result<(RunRecord, u64)> {
        let args = self.args;
        let dir = &self.dir;
        self.clean()?;
        let source = dir.join("src.img");
        let target = dir.join("dst.img");
        let control = dir.join("ctl.sock");
        let size_bytes = self.gen_image(rep)?;
        let caches_dropped = process::drop_caches();

        // Target first: it must listen before the source connects.
        let port = process::free_udp_port()?;
        let listen = format!("127.0.0.1:{port}");
        let mut serve = Guard::spawn(
            "tern serve",
            self.tern()
                .args(["serve", "--listen", &listen, "--image"])
                .arg(format!("{DISK}={}", target.display()))
                .arg("--identity")
                .arg(&self.target_id.dir)
                .args(["--peer", &self.source_id.fingerprint])
                .arg("--export-nbd")
                .arg(format!("unix:{}", dir.join("dst.nbd").display())),
            Stdio::piped(),
        )?;
        let mut serve_log = LineWatcher::new(
            serve
                .child_mut()
                .stderr
                .take()
                .context("tern serve stderr")?,
        );
        serve_log
            .wait_for(SERVE_READY, READY_TIMEOUT)
            .context("tern serve did not get ready")?;
        let mut export = Guard::spawn(
            "tern export",
            self.tern()
                .args(["export", "--image"])
                .arg(format!("{DISK}={}", source.display()))
                .arg("--nbd")
                .arg(format!("unix:{}", dir.join("src.nbd").display()))
                .arg("--control")
                .arg(&control)
                .arg("--identity")
                .arg(&self.source_id.dir)
                .args(["--cache", &args.cache]),
            Stdio::piped(),
        )?;
        let mut export_log = LineWatcher::new(
            export
                .child_mut()
                .stderr
                .take()
                .context("tern export stderr")?,
        );
        export_log
            .wait_for(EXPORT_READY, READY_TIMEOUT)
            .context("tern export did not get ready")?;
        // Every event of the daemon, from before the migration to after the commit.
        let mut events = Guard::new(
            "tern ctl events",
            self.tern()
                .arg("ctl")
                .arg(&control)
                .arg("events")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("spawn tern ctl events")?,
        );
        let events_out = process::drain(events.child_mut().stdout.take());

        let (mut fio, mut fio_log) = self.start_guest(size_bytes)?;

        // The migration, step by step, as an operator would drive it.
        let steps = (|| -> anyhow::Result<(f64, f64, f64, serde_json::Value)> {
            let t0_ms = now_unix_ms();
            let t0 = Instant::now();
            self.ctl(
                &control,
                &[
                    "migrate",
                    &format!("target={listen}"),
                    &format!("peer={}", self.target_id.fingerprint),
                    &format!("mode={}", args.mode),
                    &format!("max-downtime-ms={}", args.max_downtime_ms),
                ],
                CTL_TIMEOUT,
            )?;
            self.ctl(
                &control,
                &[
                    "wait",
                    "converged",
                    "--timeout",
                    &CONVERGE_TIMEOUT_S.to_string(),
                ],
                Duration::from_secs(CONVERGE_TIMEOUT_S + 60),
            )?;
            let t1_ms = now_unix_ms();
            let converge_s = t0.elapsed().as_secs_f64();
            // The guest keeps writing, then stops (a VMM pauses the VM); fio writes its logs.
            thread::sleep(AFTER_CONVERGED);
            if fio.interrupt(FIO_EXIT_TIMEOUT)?.is_none() {
                bail!("fio did not exit within {FIO_EXIT_TIMEOUT:?} of SIGINT");
            }
            let switchover = self.ctl(&control, &["switchover", "commit=true"], CTL_TIMEOUT)?;
            let switchover: serde_json::Value = serde_json::from_str(&switchover)
                .with_context(|| format!("parse the switchover reply {switchover:?}"))?;
            Ok((t0_ms, t1_ms, converge_s, switchover))
        })();
        let (t0_ms, t1_ms, converge_s, switchover) = match steps {
            Ok(steps) => steps,
            Err(e) => {
                serve_log.collect();
                export_log.collect();
                fio_log.collect();
                return Err(e.context(format!(
                    "repetition {rep} failed\n--- tern export (last lines):\n{}\n--- tern serve (last lines):\n{}\n--- fio:\n{}",
                    export_log.tail(),
                    serve_log.tail(),
                    fio_log.tail()
                )));
            }
        };

        // Daemons down (the target flushes), then the independent check.
        export.stop(DAEMON_EXIT_TIMEOUT)?;
        serve.stop(DAEMON_EXIT_TIMEOUT)?;
        // The daemon closed the control connection: `tern ctl events` ends by itself.
        events.stop(DAEMON_EXIT_TIMEOUT)?;
        let (mode_changes, quiesce_ms) =
            parse_events(&events_out.join().unwrap_or_default(), t0_ms);
        let target_equal = process::images_equal(&source, &target)?;
        if !target_equal {
            bail!(
                "repetition {rep}: qemu-img compare says {} differs from {} (kept for inspection)",
                target.display(),
                source.display()
            );
        }

        let Guest {
            before,
            during,
            timeline_mib_s,
            migrate_at_s,
            fio_bytes_written,
        } = self.guest(t0_ms, t1_ms)?;
        let number = |key: &str| {
            switchover[key]
                .as_f64()
                .with_context(|| format!("switchover reply has no number {key:?}: {switchover}"))
        };
        let count = |key: &str| {
            switchover[key]
                .as_u64()
                .with_context(|| format!("switchover reply has no count {key:?}: {switchover}"))
        };
        let record = RunRecord {
            rep,
            caches_dropped,
            total_s: number("total-time-s")?,
            converge_s,
            downtime_ms: number("downtime-ms")?,
            verified: switchover["verified"] == true,
            bytes_total: count("bytes-total")?,
            bytes_wire: count("bytes-wire")?,
            bytes_resent: count("bytes-resent")?,
            passes: count("passes")?,
            during_vs_intended: args.intended().map(|rate| during.mib_s / rate),
            during_vs_before: (before.mib_s > 0.0).then(|| during.mib_s / before.mib_s),
            before,
            during,
            fio_bytes_written,
            timeline_mib_s,
            migrate_at_s,
            mode_changes,
            quiesce_ms,
            target_equal,
        };
        self.keep_logs(&format!("rep-{rep}"))?;
        self.clean()?;
        Ok((record, size_bytes))
    }

    /// `tern gen-image` of the source image for repetition `rep` (its seed); returns its size.
    pub(crate) fn gen_image(&self, rep: u32) -> anyhow::Result<u64> {
        let source = self.dir.join("src.img");
        run_timed(
            "tern gen-image",
            self.tern()
                .arg("gen-image")
                .arg("--out")
                .arg(&source)
                .args(["--size", &self.args.size, "--mix", MIX, "--seed"])
                .arg(rep.to_string())
                .arg("--sync"),
            LONG_TIMEOUT,
        )?
        .check("tern gen-image")?;
        Ok(fs::metadata(&source)?.len())
    }

    /// Starts fio writing through `src.nbd` and lets it write for the baseline window; fails
    /// if it stops meanwhile.
    pub(crate) fn start_guest(&self, size_bytes: u64) -> anyhow::Result<(Guard, LineWatcher)> {
        let mut fio = Guard::spawn(
            "fio",
            Command::new("fio").args(fio_args(self.args, &self.dir, size_bytes)),
            Stdio::piped(),
        )?;
        let mut fio_log = LineWatcher::new(fio.child_mut().stderr.take().context("fio stderr")?);
        thread::sleep(BASELINE);
        if let Some(status) = fio.wait_timeout(Duration::ZERO)? {
            fio_log.collect();
            bail!(
                "fio exited with {status} before the migration: {}",
                fio_log.tail()
            );
        }
        Ok((fio, fio_log))
    }

    /// What the stopped guest did, from fio's JSON and latency log: the window before
    /// `t0_ms` and the window `t0_ms` → `t1_ms` (Unix ms).
    pub(crate) fn guest(&self, t0_ms: f64, t1_ms: f64) -> anyhow::Result<Guest> {
        let fio_bytes_written = fio_written(&self.dir.join("fio.json"))?;
        let log_path = self.dir.join(LAT_LOG);
        let log = fs::read_to_string(&log_path)
            .with_context(|| format!("read fio's latency log {}", log_path.display()))?;
        let samples = parse_lat_log(&log)?;
        let start_ms = samples
            .iter()
            .map(|s| s.time_ms - s.latency_ns / 1e6)
            .fold(f64::INFINITY, f64::min);
        if !start_ms.is_finite() || start_ms >= t0_ms {
            bail!("fio logged no write before the migration started");
        }
        Ok(Guest {
            before: window(&samples, start_ms, t0_ms, false),
            during: window(&samples, t0_ms, t1_ms, true),
            timeline_mib_s: timeline(&samples, start_ms),
            migrate_at_s: (t0_ms - start_ms) / 1e3,
            fio_bytes_written,
        })
    }

    /// With `--keep-logs`, keeps fio's latency log and JSON as `PREFIX-lat_lat.log` and
    /// `PREFIX-fio.json`.
    pub(crate) fn keep_logs(&self, prefix: &str) -> anyhow::Result<()> {
        if self.args.keep_logs {
            for name in [LAT_LOG, "fio.json"] {
                let kept = self.dir.join(format!("{prefix}-{name}"));
                fs::rename(self.dir.join(name), &kept)
                    .with_context(|| format!("keep {}", kept.display()))?;
            }
        }
        Ok(())
    }
}

/// What the guest did in one run.
pub(crate) struct Guest {
    /// From its first write to the migration's start.
    pub(crate) before: Window,
    /// From the migration's start to convergence.
    pub(crate) during: Window,
    /// Its write rate in each second from its first write, MiB/s.
    pub(crate) timeline_mib_s: Vec<f64>,
    /// When the migration started, seconds after its first write.
    pub(crate) migrate_at_s: f64,
    /// Bytes fio reports written.
    pub(crate) fio_bytes_written: u64,
}

/// Bytes fio reports written, from its JSON output; fails if the job reports an error.
/// On SIGINT fio prints a notice into the output file before the JSON, so the JSON is taken
/// from the first `{`.
fn fio_written(path: &Path) -> anyhow::Result<u64> {
    let text = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let json = text
        .find('{')
        .map(|at| &text[at..])
        .with_context(|| format!("no JSON in {}: {text:?}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("parse {}", path.display()))?;
    let job = &value["jobs"][0];
    if job["error"].as_i64() != Some(0) {
        bail!("fio reports error {} for the guest", job["error"]);
    }
    job["write"]["io_bytes"]
        .as_u64()
        .context("fio's JSON has no jobs[0].write.io_bytes")
}

/// Parses fio's latency log (`time_ms, latency_ns, direction, block_size, offset[, ...]`),
/// keeping the writes (direction 1).
fn parse_lat_log(text: &str) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let parsed = (|| {
            let time_ms: f64 = fields.first()?.parse().ok()?;
            let latency_ns: f64 = fields.get(1)?.parse().ok()?;
            let direction: u32 = fields.get(2)?.parse().ok()?;
            let bytes: u64 = fields.get(3)?.parse().ok()?;
            Some((direction, time_ms, latency_ns, bytes))
        })();
        let Some((direction, time_ms, latency_ns, bytes)) = parsed else {
            bail!("fio latency log line {}: {line:?}", number + 1);
        };
        if direction == 1 {
            samples.push(Sample {
                time_ms,
                latency_ns,
                bytes,
            });
        }
    }
    Ok(samples)
}

/// The `mode-changed` events (times relative to `t0_ms`, Unix ms) and the switchover's
/// quiesce time, from the JSON lines of `tern ctl events`.
fn parse_events(text: &str, t0_ms: f64) -> (Vec<ModeChange>, Option<f64>) {
    let mut changes = Vec::new();
    let mut quiesce_ms = None;
    for event in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        let data = &event["data"];
        match event["event"].as_str() {
            Some("mode-changed") => {
                let stamp = &event["timestamp"];
                let at_ms = stamp["seconds"].as_f64().unwrap_or(f64::NAN) * 1e3
                    + stamp["microseconds"].as_f64().unwrap_or(0.0) / 1e3;
                let rate = |key: &str| data[key].as_f64().unwrap_or(f64::NAN) / (1u64 << 20) as f64;
                changes.push(ModeChange {
                    at_s: (at_ms - t0_ms) / 1e3,
                    throttle_mib_s: rate("throttle-bytes-per-second"),
                    transfer_mib_s: rate("transfer-rate"),
                    dirty_mib_s: rate("dirty-rate"),
                    reason: data["reason"].as_str().unwrap_or_default().to_owned(),
                });
            }
            Some("switched-over") => quiesce_ms = data["quiesce-ms"].as_f64(),
            _ => {}
        }
    }
    (changes, quiesce_ms)
}

/// The guest's write rate in each whole or partial second from `start_ms` on, MiB/s.
fn timeline(samples: &[Sample], start_ms: f64) -> Vec<f64> {
    let mut bytes: Vec<u64> = Vec::new();
    for sample in samples {
        let second = ((sample.time_ms - start_ms).max(0.0) / 1e3) as usize;
        if bytes.len() <= second {
            bytes.resize(second + 1, 0);
        }
        bytes[second] += sample.bytes;
    }
    bytes.into_iter().map(mib).collect()
}

/// The writes completed in `[from_ms, to_ms)` (`[from_ms, to_ms]` when `inclusive`).
fn window(samples: &[Sample], from_ms: f64, to_ms: f64, inclusive: bool) -> Window {
    let inside = |s: &&Sample| {
        s.time_ms >= from_ms && (s.time_ms < to_ms || inclusive && s.time_ms <= to_ms)
    };
    let mut latencies_us: Vec<f64> = Vec::new();
    let mut bytes = 0u64;
    for sample in samples.iter().filter(inside) {
        latencies_us.push(sample.latency_ns / 1e3);
        bytes += sample.bytes;
    }
    latencies_us.sort_by(f64::total_cmp);
    let seconds = (to_ms - from_ms) / 1e3;
    Window {
        seconds,
        writes: latencies_us.len(),
        mib_s: if seconds > 0.0 {
            mib(bytes) / seconds
        } else {
            0.0
        },
        p50_us: percentile(&latencies_us, 0.50),
        p99_us: percentile(&latencies_us, 0.99),
    }
}

/// Median, min and max of every reported quantity.
fn summarize_runs(runs: &[RunRecord]) -> Vec<Metric> {
    let metric = |name: &'static str, digits: usize, value: &dyn Fn(&RunRecord) -> Option<f64>| {
        let values: Vec<f64> = runs.iter().filter_map(value).collect();
        Metric {
            name,
            summary: summarize(&values),
            digits,
        }
    };
    vec![
        metric("total time, migrate → commit (s)", 2, &|r| {
            Some(r.total_s)
        }),
        metric("time to converge (s)", 2, &|r| Some(r.converge_s)),
        metric("storage downtime (ms)", 1, &|r| Some(r.downtime_ms)),
        metric("guest MiB/s before", 1, &|r| Some(r.before.mib_s)),
        metric("guest MiB/s during", 1, &|r| Some(r.during.mib_s)),
        metric("during / intended rate", 2, &|r| r.during_vs_intended),
        metric("during / before rate", 2, &|r| r.during_vs_before),
        metric("write p50 before (µs)", 0, &|r| r.before.p50_us),
        metric("write p50 during (µs)", 0, &|r| r.during.p50_us),
        metric("write p99 before (µs)", 0, &|r| r.before.p99_us),
        metric("write p99 during (µs)", 0, &|r| r.during.p99_us),
        metric("on the wire (MiB)", 0, &|r| Some(mib(r.bytes_wire))),
        metric("re-sent (MiB)", 0, &|r| Some(mib(r.bytes_resent))),
        metric("passes", 0, &|r| Some(r.passes as f64)),
        metric("mode changes", 0, &|r| Some(r.mode_changes.len() as f64)),
        metric("NBD hold at switchover (ms)", 2, &|r| r.quiesce_ms),
    ]
}

/// A report cell for the mode changes of one run: how many, and the last limit and when.
fn mode_changes(changes: &[ModeChange]) -> String {
    match changes.last() {
        None => "0".to_owned(),
        Some(last) => format!(
            "{} (last: {:.0} MiB/s at {:.1} s)",
            changes.len(),
            last.throttle_mib_s,
            last.at_s
        ),
    }
}

/// The Markdown report.
fn render(config: &NbdConfig, runs: &[RunRecord], metrics: &[Metric]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let rate = match config.rate_mib_s {
        Some(rate) => format!("{rate} MiB/s"),
        None => "unpaced".to_owned(),
    };
    let dropped = runs.iter().filter(|r| r.caches_dropped).count();
    let _ = writeln!(
        out,
        "# tern-bench nbd: live migration through the NBD export, fio guest {rate} QD{}\n",
        config.queue_depth
    );
    let _ = writeln!(
        out,
        "Image: {:.0} MiB, mix `{}`, seed = repetition; {} repetition(s); mode `{}`, \
         downtime budget {} ms; `tern export --cache {}`; page cache dropped before \
         {dropped}/{} runs.  ",
        mib(config.size_bytes),
        config.mix,
        config.reps,
        config.mode,
        config.max_downtime_ms,
        config.cache,
        runs.len()
    );
    let _ = writeln!(
        out,
        "Guest ({}): `{}`.  ",
        config.fio_version, config.fio_cmd
    );
    let _ = writeln!(out, "tern: `{}`.\n", config.tern);

    let _ = writeln!(
        out,
        "| rep | total s | converge s | downtime ms | MiB/s before → during | during / intended | p50 µs before → during | p99 µs before → during | wire MiB | re-sent MiB | passes | mode changes | verified | target = source |"
    );
    let _ = writeln!(
        out,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"
    );
    for r in runs {
        let _ = writeln!(
            out,
            "| {} | {:.2} | {:.2} | {:.1} | {:.1} → {:.1} | {} | {} → {} | {} → {} | {:.0} | {:.0} | {} | {} | {} | {} |",
            r.rep,
            r.total_s,
            r.converge_s,
            r.downtime_ms,
            r.before.mib_s,
            r.during.mib_s,
            opt(r.during_vs_intended, 2),
            opt(r.before.p50_us, 0),
            opt(r.during.p50_us, 0),
            opt(r.before.p99_us, 0),
            opt(r.during.p99_us, 0),
            mib(r.bytes_wire),
            mib(r.bytes_resent),
            r.passes,
            mode_changes(&r.mode_changes),
            if r.verified { "yes" } else { "**NO**" },
            if r.target_equal { "yes" } else { "**NO**" },
        );
    }

    let _ = writeln!(
        out,
        "\n| quantity | median | min | max |\n|---|---:|---:|---:|"
    );
    for m in metrics {
        let value = |f: fn(&Summary) -> f64| opt(m.summary.as_ref().map(f), m.digits);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            m.name,
            value(|s| s.median),
            value(|s| s.min),
            value(|s| s.max)
        );
    }
    let all_verified = runs.iter().all(|r| r.verified);
    let _ = writeln!(
        out,
        "| verified (digests) and target = source (`qemu-img compare`) | {} | | |",
        if all_verified {
            "all runs"
        } else {
            "**NOT all runs**"
        }
    );
    let _ = writeln!(
        out,
        "\nSteps per repetition: `tern serve --export-nbd` and `tern export` started, fio writes \
         through the source's NBD export for {} s (\"before\"), `tern ctl migrate` (t0), `tern \
         ctl wait converged` returns (t1; \"during\" = t0 → t1), the guest writes {} s more and \
         is stopped with SIGINT (a VMM pausing the VM), then `tern ctl switchover commit=true`. \
         Total time is the daemon's `total-time-s` (migrate → commit, so it includes those {} \
         s and stopping fio); downtime is the switchover's `downtime-ms` (hold of the NBD \
         clients → verified handoff). Guest rates and latencies come from fio's per-IO log \
         (`{LAT_LOG}`: total latency, submission to completion); a window's rate is the bytes \
         of the writes completing in it over its length. fio's `--rate` catches up after a \
         slow stretch, so a paced guest's average can hide stalls: compare the p99s.",
        BASELINE.as_secs(),
        AFTER_CONVERGED.as_secs(),
        AFTER_CONVERGED.as_secs()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::{Sample, parse_events, parse_lat_log, timeline, window};

    #[test]
    fn latency_log_keeps_writes_and_reads_every_field() {
        let log = "1795686967198, 7784484, 1, 16384, 0\n\
                   1795686967199, 184541, 0, 4096, 0\n\
                   1795686967200, 149393, 1, 28672, 0, 0\n\n";
        let samples = parse_lat_log(log).unwrap();
        assert_eq!(
            samples,
            vec![
                Sample {
                    time_ms: 1795686967198.0,
                    latency_ns: 7784484.0,
                    bytes: 16384
                },
                Sample {
                    time_ms: 1795686967200.0,
                    latency_ns: 149393.0,
                    bytes: 28672
                },
            ]
        );
        assert!(parse_lat_log("12, x, 1, 4096\n").is_err());
        assert!(parse_lat_log("12, 5\n").is_err());
    }

    #[test]
    fn events_give_mode_changes_relative_to_t0_and_the_quiesce_time() {
        let text = r#"{"event":"started","data":{"migration":"m1"},"timestamp":{"seconds":100,"microseconds":0}}
{"event":"mode-changed","data":{"throttle-bytes-per-second":104857600,"reason":"stalled","dirty-bytes":1,"dirty-rate":524288000.0,"transfer-rate":419430400.0,"migration":"m1"},"timestamp":{"seconds":103,"microseconds":500000}}
not json
{"event":"switched-over","data":{"downtime-ms":1.5,"quiesce-ms":0.25,"verified":true},"timestamp":{"seconds":110,"microseconds":0}}
"#;
        let (changes, quiesce) = parse_events(text, 101_000.0);
        assert_eq!(changes.len(), 1);
        let change = &changes[0];
        assert!((change.at_s - 2.5).abs() < 1e-9, "{change:?}");
        assert_eq!(change.throttle_mib_s, 100.0);
        assert_eq!(change.transfer_mib_s, 400.0);
        assert_eq!(change.dirty_mib_s, 500.0);
        assert_eq!(change.reason, "stalled");
        assert_eq!(quiesce, Some(0.25));
        assert_eq!(parse_events("", 0.0), (Vec::new(), None));
    }

    #[test]
    fn timeline_buckets_bytes_per_second_from_the_start() {
        let at = |time_ms: f64| Sample {
            time_ms,
            latency_ns: 1e5,
            bytes: 1 << 20,
        };
        let samples = [at(1000.0), at(1999.0), at(3500.0), at(900.0)];
        // A completion before the start (cannot happen with a real start) counts in second 0.
        assert_eq!(timeline(&samples, 1000.0), vec![3.0, 0.0, 1.0]);
        assert!(timeline(&[], 0.0).is_empty());
    }

    #[test]
    fn windows_split_at_the_boundary_and_compute_rate_and_percentiles() {
        // One 1 MiB write every 100 ms from t = 0 to 1900 ms, latency 1..=20 ms.
        let samples: Vec<Sample> = (0..20)
            .map(|i| Sample {
                time_ms: f64::from(i) * 100.0,
                latency_ns: f64::from(i + 1) * 1e6,
                bytes: 1 << 20,
            })
            .collect();
        let before = window(&samples, 0.0, 1000.0, false);
        assert_eq!(before.writes, 10);
        assert!((before.mib_s - 10.0).abs() < 1e-9, "{before:?}");
        assert_eq!(before.p50_us, Some(5000.0));
        assert_eq!(before.p99_us, Some(10000.0));
        let during = window(&samples, 1000.0, 1900.0, true);
        assert_eq!(during.writes, 10);
        assert!((during.seconds - 0.9).abs() < 1e-9);
        assert_eq!(during.p50_us, Some(15000.0));
        assert_eq!(during.p99_us, Some(20000.0));
        let empty = window(&samples, 5000.0, 6000.0, true);
        assert_eq!(empty.writes, 0);
        assert_eq!(empty.mib_s, 0.0);
        assert_eq!(empty.p50_us, None);
    }
}
