//! The live scenario: a live migration with a real NBD client writing, Tern and its peers
//! on the same case, interleaved. Per repetition and system, the source and the target run
//! as separate processes, `fio --ioengine=nbd` writes random blocks through the source's
//! NBD export (unless the case's guest is idle), the migration runs to convergence, the
//! guest writes 2 s more and is stopped (as a VMM pauses a VM), and the switchover commits.
//! Tern: `tern serve --export-nbd` (target) and `tern export` (source), driven by `tern
//! ctl` step by step (`migrate`, `wait converged`, `switchover commit=true`). QEMU: see
//! [`crate::qemu`]. The guest's write rate and latency come from fio's per-IO latency log,
//! split into the window before the migration and the window until convergence; CPU time
//! and peak memory of both daemons come from `/proc`, the bytes on the link from the
//! kernel's interface counters ([`crate::link`]).
//!
//! This is the QEMU method of `../shared/README.md` (the VM pauses 2 s after READY).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::case::{Case, System, Writer};
use crate::copy::{Identity, MIX, default_tern, keygen, remove_target};
use crate::link::{Link, LinkSpec};
use crate::measure::{CoursePoint, Usage, quantiles};
use crate::process::{self, Guard, LineWatcher, run_timed};
use crate::qemu;
use crate::report::opt;
use crate::stats::percentile;

/// Bound on `tern gen-image` and `qemu-img compare` of one image.
const LONG_TIMEOUT: Duration = Duration::from_secs(3600);
/// Bound on a daemon getting ready.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one `tern ctl` command other than `wait`.
const CTL_TIMEOUT: Duration = Duration::from_secs(120);
/// `tern ctl wait converged --timeout`, seconds.
pub(crate) const CONVERGE_TIMEOUT_S: u64 = 3600;
/// Bound on fio exiting after SIGINT (it writes its logs and its JSON first).
pub(crate) const FIO_EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on a daemon exiting after SIGTERM (it flushes its disks first).
pub(crate) const DAEMON_EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the guest writes before the migration starts (the "before" window).
pub(crate) const BASELINE: Duration = Duration::from_secs(2);
/// How long the guest keeps writing after convergence before it is stopped.
pub(crate) const AFTER_CONVERGED: Duration = Duration::from_secs(2);
/// How often the course of a migration is sampled (Tern's progress events, QEMU's
/// `query-block-jobs`).
pub(crate) const COURSE_INTERVAL: Duration = Duration::from_millis(200);
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
/// Quantiles kept of the guest's write latency during the migration (for the CDF plot).
const LATENCY_QUANTILES: usize = 200;

/// Arguments of `tern-bench nbd`: one live case from the command line.
#[derive(clap::Args, Debug)]
pub(crate) struct NbdArgs {
    /// Repetitions.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,
    /// Image size, as `tern gen-image --size` takes it (e.g. 2G, 256M).
    #[arg(long, default_value = "2G")]
    size: String,
    /// The guest's write rate, MiB/s (fio `--rate`); ignored with `--unpaced` or `--idle`.
    #[arg(long, default_value_t = 32.0)]
    rate: f64,
    /// The guest's queue depth (fio `--iodepth`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    queue_depth: u32,
    /// Write as fast as the export accepts (no fio `--rate`).
    #[arg(long, conflicts_with = "idle")]
    unpaced: bool,
    /// No guest at all (an idle VM).
    #[arg(long)]
    idle: bool,
    /// The link: `loopback`, `tbf:MBIT` (a veth pair to a network namespace shaped with
    /// tbf; needs root) or `wan:MBIT:RTT_MS:LOSS` (the user-space emulator).
    #[arg(long, default_value = "loopback")]
    link: LinkSpec,
    /// Tern with `migrate congestion=bbr` (QUIC BBR instead of CUBIC).
    #[arg(long)]
    bbr: bool,
    /// Tern's migration mode (`migrate mode=`).
    #[arg(long, default_value = "auto", value_parser = ["auto", "background", "active"])]
    mode: String,
    /// Storage downtime budget (`migrate max-downtime-ms=`).
    #[arg(long, default_value_t = 50)]
    max_downtime_ms: u64,
    /// Page cache use of the sources (`tern export --cache`; QEMU's source cache.direct).
    #[arg(long, default_value = "writeback", value_parser = ["none", "writeback"])]
    cache: String,
    /// Also run QEMU's mirror in these copy modes, interleaved with Tern in every
    /// repetition: `background`, `write-blocking`, either with `-tls` (NBD over TLS, x509
    /// credentials on both daemons). Comma-separated or repeated.
    #[arg(long, value_delimiter = ',', value_parser = ["background", "write-blocking", "background-tls", "write-blocking-tls"])]
    qemu: Vec<String>,
    /// Page cache use of QEMU's target image (`none`: cache.direct=on, like `tern serve`'s
    /// O_DIRECT target; `writeback`: cache.direct=off).
    #[arg(long, default_value = "none", value_parser = ["none", "writeback"])]
    qemu_target_cache: String,
    /// Scratch directory for images, identities, sockets and fio's logs (not tmpfs: the
    /// targets use O_DIRECT).
    #[arg(long, default_value = "tern-bench-work")]
    dir: PathBuf,
    /// Directory for the report (`nbd-CASE.md`, also printed), the raw runs
    /// (`nbd-CASE.json`) and the plots (`nbd-CASE-*.svg`).
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// The `tern` binary; by default the one next to this binary, else `tern` on PATH.
    #[arg(long)]
    tern: Option<PathBuf>,
    /// Keep fio's latency log and JSON of each run in the scratch directory
    /// (`CASE-SYSTEM-rep-N-lat_lat.log`, `CASE-SYSTEM-rep-N-fio.json`), and the stderr of
    /// Tern's daemons (`CASE-tern-rep-N-serve.log`, `...-export.log`; `RUST_LOG` sets
    /// what they log).
    #[arg(long)]
    keep_logs: bool,
}

impl NbdArgs {
    /// The case these options describe.
    fn case(&self) -> anyhow::Result<Case> {
        let writer = if self.idle {
            Writer::None
        } else if self.unpaced {
            Writer::Unpaced {
                queue_depth: self.queue_depth,
            }
        } else {
            Writer::Paced {
                rate_mib_s: self.rate,
                queue_depth: self.queue_depth,
            }
        };
        let guest = match writer {
            Writer::None => "idle".to_owned(),
            Writer::Paced {
                rate_mib_s,
                queue_depth,
            } => format!("qd{queue_depth}-{rate_mib_s}mibs"),
            Writer::Unpaced { queue_depth } => format!("qd{queue_depth}-unpaced"),
        };
        let link = match &self.link {
            LinkSpec::Loopback => String::new(),
            other => format!("-{}", other.to_string().replace([':', '.'], "-")),
        };
        let mut systems = vec![System::Tern { bbr: self.bbr }];
        for mode in &self.qemu {
            systems.push(format!("qemu-{mode}").parse()?);
        }
        let case = Case {
            name: format!("{guest}-{}{link}", self.mode),
            size: self.size.clone(),
            mix: MIX.to_owned(),
            reps: self.reps,
            writer,
            link: self.link.clone(),
            mode: self.mode.clone(),
            max_downtime_ms: self.max_downtime_ms,
            cache: self.cache.clone(),
            qemu_target_cache: self.qemu_target_cache.clone(),
            systems,
        };
        case.validate()?;
        Ok(case)
    }
}

/// Runs one case from the command line and writes its report, JSON and plots.
pub(crate) fn run(args: &NbdArgs) -> anyhow::Result<()> {
    let case = args.case()?;
    let tern = args.tern.clone().unwrap_or_else(default_tern);
    let env = Env::prepare(&tern, &args.dir, &case.systems)?;
    let results = run_case(&env, &case, args.keep_logs)?;
    fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let (_, report) = crate::compare::write(&results, &args.out)?;
    print!("{report}");
    Ok(())
}

/// What every case of one invocation shares: binaries, identities, credentials, versions.
pub(crate) struct Env {
    /// The `tern` binary.
    pub(crate) tern: PathBuf,
    /// Scratch directory (absolute).
    pub(crate) dir: PathBuf,
    /// The source daemon's identity.
    source_id: Identity,
    /// The target's identity.
    target_id: Identity,
    /// `fio --version`.
    pub(crate) fio_version: String,
    /// `qemu-storage-daemon --version`'s first line, if a QEMU system runs.
    pub(crate) qemu_version: Option<String>,
    /// QEMU's x509 credentials (`server/` and `client/`), if a QEMU system uses TLS.
    pub(crate) qemu_tls: Option<PathBuf>,
}

impl Env {
    /// Checks the tools the systems need and makes the identities and credentials.
    pub(crate) fn prepare(tern: &Path, dir: &Path, systems: &[System]) -> anyhow::Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let dir = dir.canonicalize()?;
        let fio_version = first_line("fio", "--version", "install fio")?;
        let any_qemu = systems.iter().any(|s| !s.is_tern());
        let qemu_version = if any_qemu {
            Some(first_line(
                "qemu-storage-daemon",
                "--version",
                "install qemu-system-x86 or qemu-utils",
            )?)
        } else {
            None
        };
        let any_tls = systems
            .iter()
            .any(|s| matches!(s, System::Qemu { tls: true, .. }));
        let qemu_tls = if any_tls {
            Some(qemu::make_tls_credentials(&dir.join("qemu-tls"))?)
        } else {
            None
        };
        Ok(Self {
            tern: tern.to_owned(),
            source_id: keygen(tern, &dir.join("nbd-src-id"))?,
            target_id: keygen(tern, &dir.join("nbd-dst-id"))?,
            dir,
            fio_version,
            qemu_version,
            qemu_tls,
        })
    }
}

/// The first line `program ARG` prints; fails with `hint`.
fn first_line(program: &str, arg: &str, hint: &str) -> anyhow::Result<String> {
    Ok(run_timed(
        &format!("{program} {arg}"),
        Command::new(program).arg(arg),
        Duration::from_secs(10),
    )
    .with_context(|| format!("{program} ({hint})"))?
    .check(&format!("{program} {arg} ({hint})"))?
    .stdout
    .lines()
    .next()
    .unwrap_or_default()
    .trim()
    .to_owned())
}

/// Everything one case measured.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct CaseResults {
    /// The case.
    pub(crate) case: Case,
    /// Virtual size of its image, bytes.
    pub(crate) size_bytes: u64,
    /// The guest's command line (DIR stands for the scratch directory), if any.
    pub(crate) fio_cmd: Option<String>,
    /// `fio --version`.
    pub(crate) fio_version: String,
    /// `qemu-storage-daemon --version`, if a QEMU system ran.
    pub(crate) qemu_version: Option<String>,
    /// The tern binary used.
    pub(crate) tern: String,
    /// Every run, in run order.
    pub(crate) runs: Vec<Run>,
}

/// Runs every repetition of `case`, each system in turn.
pub(crate) fn run_case(env: &Env, case: &Case, keep_logs: bool) -> anyhow::Result<CaseResults> {
    let link = Link::up(&case.link)?;
    let bench = Bench {
        env,
        case,
        link: &link,
        keep_logs,
    };
    let mut runs = Vec::new();
    let mut size_bytes = 0;
    for rep in 1..=case.reps {
        for &system in &case.systems {
            eprintln!(
                "tern-bench: {}: {system}, repetition {rep}/{}",
                case.name, case.reps
            );
            let (run, size) = match system {
                System::Tern { bbr } => bench.run_tern(rep, system, bbr)?,
                System::Qemu { .. } => qemu::run_one(&bench, rep, system)?,
            };
            size_bytes = size;
            eprintln!(
                "tern-bench:   total {:.2} s, converged after {:.2} s, downtime {:.1} ms, guest {} → {} MiB/s, p99 {} → {} µs, CPU {:.2} + {:.2} s, RSS {:.0} / {:.0} MiB, link {:.0} MiB, target = source {}",
                run.total_s,
                run.converge_s,
                run.downtime_ms,
                opt(run.before.as_ref().map(|w| w.mib_s), 1),
                opt(run.during.as_ref().map(|w| w.mib_s), 1),
                opt(run.before.as_ref().and_then(|w| w.p99_us), 0),
                opt(run.during.as_ref().and_then(|w| w.p99_us), 0),
                run.source.cpu_s,
                run.target.cpu_s,
                mib(run.source.peak_rss_bytes),
                mib(run.target.peak_rss_bytes),
                mib(run.link_bytes),
                run.equal
            );
            runs.push(run);
        }
    }
    Ok(CaseResults {
        case: case.clone(),
        size_bytes,
        fio_cmd: (case.writer != Writer::None)
            .then(|| fio_command_line(case, Path::new("DIR"), size_bytes)),
        fio_version: env.fio_version.clone(),
        qemu_version: env.qemu_version.clone(),
        tern: env.tern.display().to_string(),
        runs,
    })
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

/// One run of one system on one repetition's image.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Run {
    /// Which system.
    pub(crate) system: System,
    /// Repetition, from 1 (also the image's seed).
    pub(crate) rep: u32,
    /// Whether the page cache was dropped before the daemons started.
    pub(crate) caches_dropped: bool,
    /// From the start of the migration to the commit (Tern: the daemon's `total-time-s`,
    /// `migrate` → commit; QEMU: `blockdev-mirror` → `BLOCK_JOB_COMPLETED`); with a guest,
    /// includes the 2 s it keeps writing after convergence.
    pub(crate) total_s: f64,
    /// From the start of the migration to convergence (Tern: `wait converged` returns;
    /// QEMU: `BLOCK_JOB_READY`).
    pub(crate) converge_s: f64,
    /// Storage downtime, ms (Tern: the switchover's `downtime-ms`, hold of the NBD clients
    /// → verified handoff; QEMU: `block-job-complete` → `BLOCK_JOB_COMPLETED`).
    pub(crate) downtime_ms: f64,
    /// `qemu-img compare` found the target equal to the source (Tern: and its per-chunk
    /// digests matched).
    pub(crate) equal: bool,
    /// Bytes the link carried, both directions, headers included.
    pub(crate) link_bytes: u64,
    /// Bytes of the disk processed more than once (Tern: `bytes-resent`; QEMU: the job's
    /// final `offset` beyond the disk size).
    pub(crate) bytes_again: u64,
    /// The source daemon's CPU time and peak memory.
    pub(crate) source: Usage,
    /// The target daemon's CPU time and peak memory.
    pub(crate) target: Usage,
    /// The migration's course, sampled every [`COURSE_INTERVAL`].
    pub(crate) course: Vec<CoursePoint>,
    /// The guest from its first write to the start of the migration (no guest: `None`).
    pub(crate) before: Option<Window>,
    /// The guest from the start of the migration to convergence.
    pub(crate) during: Option<Window>,
    /// `during.mib_s` / intended rate (paced guests only).
    pub(crate) during_vs_intended: Option<f64>,
    /// The guest's write latency during the migration, µs: the quantiles 0, 1/200, …, 1.
    pub(crate) during_latency_us: Vec<f64>,
    /// The guest's write rate in each second from its first write to its stop, MiB/s.
    pub(crate) timeline_mib_s: Vec<f64>,
    /// When the migration started, seconds after the guest's first write.
    pub(crate) migrate_at_s: Option<f64>,
    /// Bytes fio wrote in the whole run (its JSON), a cross-check of the log.
    pub(crate) fio_bytes_written: Option<u64>,
    /// What only Tern reports.
    pub(crate) tern: Option<TernDetails>,
}

/// What only Tern's runs report.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct TernDetails {
    /// Bytes sent over QUIC, after compression (payload only).
    pub(crate) bytes_wire: u64,
    /// Passes over the dirty bitmap.
    pub(crate) passes: u64,
    /// The engine's `mode-changed` events (auto mode throttling the guest).
    pub(crate) mode_changes: Vec<ModeChange>,
    /// How long holding the NBD clients took at switchover (`switched-over` event), ms.
    pub(crate) quiesce_ms: Option<f64>,
}

/// A `mode-changed` event: auto mode limited the guest's writes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct ModeChange {
    /// Seconds after the `migrate` command.
    pub(crate) at_s: f64,
    /// The new write limit, MiB/s.
    pub(crate) throttle_mib_s: f64,
    /// The transfer rate the engine measured, MiB/s.
    pub(crate) transfer_mib_s: f64,
    /// The rate at which the guest dirtied data, MiB/s.
    pub(crate) dirty_mib_s: f64,
    /// The engine's reason.
    pub(crate) reason: String,
}

/// fio's arguments for the guest (without the program name); the case has a writer.
fn fio_args(case: &Case, dir: &Path, size_bytes: u64) -> Vec<String> {
    let queue_depth = match case.writer {
        Writer::Paced { queue_depth, .. } | Writer::Unpaced { queue_depth } => queue_depth,
        Writer::None => 1,
    };
    let mut fio = vec![
        "--name=guest".to_owned(),
        "--ioengine=nbd".to_owned(),
        format!(
            "--uri=nbd+unix:///{DISK}?socket={}",
            dir.join("src.nbd").display()
        ),
        "--rw=randwrite".to_owned(),
        "--bsrange=4k-64k".to_owned(),
        format!("--iodepth={queue_depth}"),
    ];
    if let Some(rate) = case.intended() {
        // In KiB/s, so that a fractional MiB/s rate is exact enough.
        fio.push(format!("--rate={}k", (rate * 1024.0).round() as u64));
    }
    fio.extend([
        format!("--size={size_bytes}"),
        "--time_based".to_owned(),
        "--runtime=36000".to_owned(),
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
fn fio_command_line(case: &Case, dir: &Path, size_bytes: u64) -> String {
    let mut line = "fio".to_owned();
    for arg in fio_args(case, dir, size_bytes) {
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

/// One case being run.
pub(crate) struct Bench<'a> {
    /// The shared set-up.
    pub(crate) env: &'a Env,
    /// The case.
    pub(crate) case: &'a Case,
    /// Its link, set up.
    pub(crate) link: &'a Link,
    /// Keep fio's logs and the daemons' stderr of every run.
    keep_logs: bool,
}

/// The guest of one run, while it writes.
pub(crate) struct RunningGuest {
    /// fio.
    fio: Guard,
    /// Its stderr.
    pub(crate) log: LineWatcher,
}

impl RunningGuest {
    /// Stops the guest (SIGINT: fio writes its logs and JSON) after it wrote
    /// [`AFTER_CONVERGED`] more, as a VMM pauses a VM.
    pub(crate) fn pause(mut self) -> anyhow::Result<()> {
        thread::sleep(AFTER_CONVERGED);
        if self.fio.interrupt(FIO_EXIT_TIMEOUT)?.is_none() {
            bail!("fio did not exit within {FIO_EXIT_TIMEOUT:?} of SIGINT");
        }
        Ok(())
    }
}

impl Bench<'_> {
    /// A `tern` command with plain-text logs.
    fn tern(&self) -> Command {
        let mut cmd = Command::new(&self.env.tern);
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

    /// The scratch directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.env.dir
    }

    /// Removes the scratch files of one run.
    pub(crate) fn clean(&self) -> anyhow::Result<()> {
        let dir = self.dir();
        for name in [
            "src.img", "src.nbd", "dst.nbd", "ctl.sock", "fio.json", "src.qmp", "dst.qmp",
        ] {
            remove_target(&dir.join(name))?;
        }
        for suffix in ["lat", "clat", "slat"] {
            remove_target(&dir.join(format!("{LAT_PREFIX}_{suffix}.log")))?;
        }
        remove_target(&dir.join("dst.img"))
    }

    /// One Tern run on the image of repetition `rep`; returns it and the image size.
    fn run_tern(&self, rep: u32, system: System, bbr: bool) -> anyhow::Result<(Run, u64)> {
        let case = self.case;
        let dir = self.dir();
        self.clean()?;
        let source = dir.join("src.img");
        let target = dir.join("dst.img");
        let control = dir.join("ctl.sock");
        let size_bytes = self.gen_image(rep)?;
        let caches_dropped = process::drop_caches();

        // Target first: it must listen before the source connects.
        let listen = std::net::SocketAddr::new(self.link.target_ip(), process::free_udp_port()?);
        let mut serve_cmd = self.link.on_target(&self.env.tern);
        serve_cmd
            .env("NO_COLOR", "1")
            .args(["--log-format", "text", "serve", "--listen"])
            .arg(listen.to_string())
            .arg("--image")
            .arg(format!("{DISK}={}", target.display()))
            .arg("--identity")
            .arg(&self.env.target_id.dir)
            .args(["--peer", &self.env.source_id.fingerprint])
            .arg("--export-nbd")
            .arg(format!("unix:{}", dir.join("dst.nbd").display()));
        let mut serve = Guard::spawn("tern serve", &mut serve_cmd, Stdio::piped())?;
        let mut serve_log = LineWatcher::copying(
            serve
                .child_mut()
                .stderr
                .take()
                .context("tern serve stderr")?,
            self.daemon_log(rep, "serve"),
        );
        serve_log
            .wait_for(SERVE_READY, READY_TIMEOUT)
            .context("tern serve did not get ready")?;
        let route = self.link.route_udp(listen)?;
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
                .arg(&self.env.source_id.dir)
                .args(["--cache", &case.cache])
                .arg("--progress-interval-ms")
                .arg(COURSE_INTERVAL.as_millis().to_string()),
            Stdio::piped(),
        )?;
        let mut export_log = LineWatcher::copying(
            export
                .child_mut()
                .stderr
                .take()
                .context("tern export stderr")?,
            self.daemon_log(rep, "export"),
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

        let mut guest = self.start_guest(size_bytes)?;
        let link_before = self.link.bytes()?;

        // The migration, step by step, as an operator would drive it.
        let steps = (|| -> anyhow::Result<(f64, f64, f64, serde_json::Value)> {
            let t0_ms = now_unix_ms();
            let t0 = Instant::now();
            self.ctl(
                &control,
                &[
                    "migrate",
                    &format!("target={}", route.addr),
                    &format!("peer={}", self.env.target_id.fingerprint),
                    &format!("mode={}", case.mode),
                    &format!("max-downtime-ms={}", case.max_downtime_ms),
                    &format!("congestion={}", if bbr { "bbr" } else { "cubic" }),
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
            if let Some(guest) = guest.take() {
                guest.pause()?;
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
                let fio_tail = guest
                    .as_mut()
                    .map(|g| {
                        g.log.collect();
                        g.log.tail()
                    })
                    .unwrap_or_default();
                return Err(e.context(format!(
                    "{system}, repetition {rep} failed\n--- tern export (last lines):\n{}\n--- tern serve (last lines):\n{}\n--- fio:\n{fio_tail}",
                    export_log.tail(),
                    serve_log.tail(),
                )));
            }
        };
        let link_bytes = self.link.bytes()?.saturating_sub(link_before);
        let source_usage = export.usage()?;
        let target_usage = serve.usage()?;

        // Daemons down (the target flushes), then the independent check.
        export.stop(DAEMON_EXIT_TIMEOUT)?;
        serve.stop(DAEMON_EXIT_TIMEOUT)?;
        drop(route);
        // The daemon closed the control connection: `tern ctl events` ends by itself.
        events.stop(DAEMON_EXIT_TIMEOUT)?;
        let parsed = parse_events(&events_out.join().unwrap_or_default(), t0_ms);
        let target_equal = process::images_equal(&source, &target)?;
        if !target_equal {
            bail!(
                "{system}, repetition {rep}: qemu-img compare says {} differs from {} (kept for inspection)",
                target.display(),
                source.display()
            );
        }
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
        let verified = switchover["verified"] == true;
        let mut run = Run {
            system,
            rep,
            caches_dropped,
            total_s: number("total-time-s")?,
            converge_s,
            downtime_ms: number("downtime-ms")?,
            equal: verified && target_equal,
            link_bytes,
            bytes_again: count("bytes-resent")?,
            source: source_usage,
            target: target_usage,
            course: parsed.course,
            before: None,
            during: None,
            during_vs_intended: None,
            during_latency_us: Vec::new(),
            timeline_mib_s: Vec::new(),
            migrate_at_s: None,
            fio_bytes_written: None,
            tern: Some(TernDetails {
                bytes_wire: count("bytes-wire")?,
                passes: count("passes")?,
                mode_changes: parsed.mode_changes,
                quiesce_ms: parsed.quiesce_ms,
            }),
        };
        self.add_guest(&mut run, t0_ms, t1_ms)?;
        self.keep_logs(&format!("tern-rep-{rep}"))?;
        self.clean()?;
        Ok((run, size_bytes))
    }

    /// `tern gen-image` of the source image for repetition `rep` (its seed); returns its size.
    pub(crate) fn gen_image(&self, rep: u32) -> anyhow::Result<u64> {
        let source = self.dir().join("src.img");
        run_timed(
            "tern gen-image",
            self.tern()
                .arg("gen-image")
                .arg("--out")
                .arg(&source)
                .args(["--size", &self.case.size, "--mix", &self.case.mix, "--seed"])
                .arg(rep.to_string())
                .arg("--sync"),
            LONG_TIMEOUT,
        )?
        .check("tern gen-image")?;
        Ok(fs::metadata(&source)?.len())
    }

    /// Starts fio writing through `src.nbd` (if the case has a guest) and lets it write for
    /// the baseline window; fails if it stops meanwhile.
    pub(crate) fn start_guest(&self, size_bytes: u64) -> anyhow::Result<Option<RunningGuest>> {
        if self.case.writer == Writer::None {
            return Ok(None);
        }
        let mut fio = Guard::spawn(
            "fio",
            Command::new("fio").args(fio_args(self.case, self.dir(), size_bytes)),
            Stdio::piped(),
        )?;
        let mut log = LineWatcher::new(fio.child_mut().stderr.take().context("fio stderr")?);
        thread::sleep(BASELINE);
        if let Some(status) = fio.wait_timeout(Duration::ZERO)? {
            log.collect();
            bail!(
                "fio exited with {status} before the migration: {}",
                log.tail()
            );
        }
        Ok(Some(RunningGuest { fio, log }))
    }

    /// Fills in what the stopped guest did, from fio's JSON and latency log: the window
    /// before `t0_ms` and the window `t0_ms` → `t1_ms` (Unix ms). Nothing without a guest.
    pub(crate) fn add_guest(&self, run: &mut Run, t0_ms: f64, t1_ms: f64) -> anyhow::Result<()> {
        if self.case.writer == Writer::None {
            return Ok(());
        }
        let dir = self.dir();
        let fio_bytes_written = fio_written(&dir.join("fio.json"))?;
        let log_path = dir.join(LAT_LOG);
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
        let (during, latencies) = window(&samples, t0_ms, t1_ms, true);
        run.during_vs_intended = self.case.intended().map(|rate| during.mib_s / rate);
        run.before = Some(window(&samples, start_ms, t0_ms, false).0);
        run.during = Some(during);
        run.during_latency_us = quantiles(&latencies, LATENCY_QUANTILES);
        run.timeline_mib_s = timeline(&samples, start_ms);
        run.migrate_at_s = Some((t0_ms - start_ms) / 1e3);
        run.fio_bytes_written = Some(fio_bytes_written);
        Ok(())
    }

    /// With `--keep-logs`, where the stderr of Tern's daemon `name` in repetition `rep` is
    /// kept (`CASE-tern-rep-N-NAME.log`; `RUST_LOG` sets what they log).
    fn daemon_log(&self, rep: u32, name: &str) -> Option<PathBuf> {
        self.keep_logs.then(|| {
            self.dir()
                .join(format!("{}-tern-rep-{rep}-{name}.log", self.case.name))
        })
    }

    /// With `--keep-logs`, keeps fio's latency log and JSON as `PREFIX-lat_lat.log` and
    /// `PREFIX-fio.json`.
    pub(crate) fn keep_logs(&self, prefix: &str) -> anyhow::Result<()> {
        if self.keep_logs && self.case.writer != Writer::None {
            for name in [LAT_LOG, "fio.json"] {
                let kept = self
                    .dir()
                    .join(format!("{}-{prefix}-{name}", self.case.name));
                fs::rename(self.dir().join(name), &kept)
                    .with_context(|| format!("keep {}", kept.display()))?;
            }
        }
        Ok(())
    }
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

/// What `tern ctl events` told about one migration.
#[derive(Debug, Default, PartialEq)]
struct Events {
    /// The `mode-changed` events.
    mode_changes: Vec<ModeChange>,
    /// The switchover's quiesce time, ms.
    quiesce_ms: Option<f64>,
    /// The `progress` events as the migration's course.
    course: Vec<CoursePoint>,
}

/// Parses the JSON lines of `tern ctl events`; times relative to `t0_ms` (Unix ms).
fn parse_events(text: &str, t0_ms: f64) -> Events {
    let mut parsed = Events::default();
    for event in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        let data = &event["data"];
        let stamp = &event["timestamp"];
        let at_s = (stamp["seconds"].as_f64().unwrap_or(f64::NAN) * 1e3
            + stamp["microseconds"].as_f64().unwrap_or(0.0) / 1e3
            - t0_ms)
            / 1e3;
        match event["event"].as_str() {
            Some("mode-changed") => {
                let rate = |key: &str| data[key].as_f64().unwrap_or(f64::NAN) / (1u64 << 20) as f64;
                parsed.mode_changes.push(ModeChange {
                    at_s,
                    throttle_mib_s: rate("throttle-bytes-per-second"),
                    transfer_mib_s: rate("transfer-rate"),
                    dirty_mib_s: rate("dirty-rate"),
                    reason: data["reason"].as_str().unwrap_or_default().to_owned(),
                });
            }
            Some("progress") => {
                let count = |key: &str| data[key].as_u64().unwrap_or(0);
                parsed.course.push(CoursePoint {
                    t_s: at_s,
                    remaining_bytes: count("bytes-total").saturating_sub(count("bytes-done"))
                        + count("dirty-bytes"),
                    done_bytes: count("bytes-done"),
                });
            }
            Some("switched-over") => parsed.quiesce_ms = data["quiesce-ms"].as_f64(),
            _ => {}
        }
    }
    parsed
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

/// The writes completed in `[from_ms, to_ms)` (`[from_ms, to_ms]` when `inclusive`), and
/// their latencies in µs, sorted.
fn window(samples: &[Sample], from_ms: f64, to_ms: f64, inclusive: bool) -> (Window, Vec<f64>) {
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
    let window = Window {
        seconds,
        writes: latencies_us.len(),
        mib_s: if seconds > 0.0 {
            mib(bytes) / seconds
        } else {
            0.0
        },
        p50_us: percentile(&latencies_us, 0.50),
        p99_us: percentile(&latencies_us, 0.99),
    };
    (window, latencies_us)
}

#[cfg(test)]
mod tests {
    use super::{CoursePoint, Events, Sample, parse_events, parse_lat_log, timeline, window};

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
{"event":"progress","data":{"bytes-total":1000,"bytes-done":300,"dirty-bytes":50},"timestamp":{"seconds":105,"microseconds":0}}
{"event":"switched-over","data":{"downtime-ms":1.5,"quiesce-ms":0.25,"verified":true},"timestamp":{"seconds":110,"microseconds":0}}
"#;
        let parsed = parse_events(text, 101_000.0);
        assert_eq!(parsed.mode_changes.len(), 1);
        let change = &parsed.mode_changes[0];
        assert!((change.at_s - 2.5).abs() < 1e-9, "{change:?}");
        assert_eq!(change.throttle_mib_s, 100.0);
        assert_eq!(change.transfer_mib_s, 400.0);
        assert_eq!(change.dirty_mib_s, 500.0);
        assert_eq!(change.reason, "stalled");
        assert_eq!(parsed.quiesce_ms, Some(0.25));
        assert_eq!(
            parsed.course,
            vec![CoursePoint {
                t_s: 4.0,
                remaining_bytes: 700 + 50,
                done_bytes: 300
            }]
        );
        assert_eq!(parse_events("", 0.0), Events::default());
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
        let (before, _) = window(&samples, 0.0, 1000.0, false);
        assert_eq!(before.writes, 10);
        assert!((before.mib_s - 10.0).abs() < 1e-9, "{before:?}");
        assert_eq!(before.p50_us, Some(5000.0));
        assert_eq!(before.p99_us, Some(10000.0));
        let (during, latencies) = window(&samples, 1000.0, 1900.0, true);
        assert_eq!(latencies.len(), 10);
        assert_eq!(during.writes, 10);
        assert!((during.seconds - 0.9).abs() < 1e-9);
        assert_eq!(during.p50_us, Some(15000.0));
        assert_eq!(during.p99_us, Some(20000.0));
        let (empty, _) = window(&samples, 5000.0, 6000.0, true);
        assert_eq!(empty.writes, 0);
        assert_eq!(empty.mib_s, 0.0);
        assert_eq!(empty.p50_us, None);
    }
}
