//! The QEMU peer of the NBD scenario (`tern-bench nbd --peer qemu`): the same guest (fio over
//! NBD, same pattern, rate and queue depth) writes through a source `qemu-storage-daemon`'s
//! NBD export while `blockdev-mirror` (sync=full) copies the disk to a second
//! `qemu-storage-daemon` exporting the target over NBD, driven by the harness over QMP.
//!
//! Per run: both daemons started, fio writes for the baseline window ("before"),
//! `blockdev-add` of an NBD client node for the target, `blockdev-mirror` (t0), event
//! `BLOCK_JOB_READY` (t1; "during" = t0 → t1), the guest writes 2 s more and is stopped with
//! SIGINT (a VMM pausing the VM), then `block-job-complete`; storage downtime is from that
//! command to event `BLOCK_JOB_COMPLETED`, total time from `blockdev-mirror` to that event.
//! Then both daemons stop and `qemu-img compare` checks the target. This is the method of
//! `../shared/README.md` ("The QEMU peer"), with fio in place of `qemu-io`.

use std::fs;
use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Value, json};

use crate::nbd::{
    AFTER_CONVERGED, Bench, CONVERGE_TIMEOUT_S, DAEMON_EXIT_TIMEOUT, DISK, FIO_EXIT_TIMEOUT, Guest,
    NbdArgs, NbdConfig, READY_TIMEOUT, RunRecord, Window, now_unix_ms,
};
use crate::process::{self, Guard, LineWatcher, run_timed};
use crate::report::opt;
use crate::stats::{Summary, summarize};

/// The mirror's copy modes measured, in run order.
pub(crate) const MODES: [&str; 2] = ["background", "write-blocking"];
/// Bound on one QMP command's reply.
const QMP_TIMEOUT: Duration = Duration::from_secs(60);
/// The job's id.
const JOB: &str = "m";

/// One run of QEMU's mirror.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct QemuRecord {
    /// Repetition, from 1 (also the image's seed).
    pub(crate) rep: u32,
    /// `blockdev-mirror copy-mode`.
    pub(crate) copy_mode: String,
    /// Whether the page cache was dropped before the daemons started.
    pub(crate) caches_dropped: bool,
    /// From `blockdev-mirror` to `BLOCK_JOB_COMPLETED`; includes the 2 s the guest keeps
    /// writing after `BLOCK_JOB_READY` and stopping it.
    pub(crate) total_s: f64,
    /// From `blockdev-mirror` to `BLOCK_JOB_READY`.
    pub(crate) converge_s: f64,
    /// From `block-job-complete` to `BLOCK_JOB_COMPLETED`, ms.
    pub(crate) downtime_ms: f64,
    /// The guest from its first write to `blockdev-mirror`.
    pub(crate) before: Window,
    /// The guest from `blockdev-mirror` to `BLOCK_JOB_READY`.
    pub(crate) during: Window,
    /// `during.mib_s` / intended rate (paced guests only).
    pub(crate) during_vs_intended: Option<f64>,
    /// `during.mib_s` / `before.mib_s`.
    pub(crate) during_vs_before: Option<f64>,
    /// Bytes fio wrote in the whole run (its JSON).
    pub(crate) fio_bytes_written: u64,
    /// The guest's write rate in each second from its first write to its stop, MiB/s.
    pub(crate) timeline_mib_s: Vec<f64>,
    /// When `blockdev-mirror` was sent, seconds after the guest's first write.
    pub(crate) migrate_at_s: f64,
    /// `qemu-img compare` found the target identical to the source.
    pub(crate) target_equal: bool,
}

/// A QMP connection: commands are answered in order; events are kept with their arrival
/// time until asked for.
struct Qmp {
    /// Commands go here.
    writer: UnixStream,
    /// Every JSON message from the daemon with its arrival time, from a reader thread.
    lines: Receiver<(Value, Instant)>,
    /// Events received and not yet asked for.
    events: Vec<(Value, Instant)>,
}

impl Qmp {
    /// Connects to the monitor socket at `path` (retrying while the daemon starts, failing
    /// early if it exits), reads the greeting and negotiates capabilities.
    fn connect(path: &Path, daemon: &mut Guard, log: &mut LineWatcher) -> anyhow::Result<Self> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) => {
                    if let Some(status) = daemon.wait_timeout(Duration::ZERO)? {
                        log.collect();
                        bail!(
                            "qemu-storage-daemon exited with {status} before its QMP socket {} was up: {}",
                            path.display(),
                            log.tail()
                        );
                    }
                    if Instant::now() >= deadline {
                        return Err(e).with_context(|| {
                            format!("connect to QMP {} within {READY_TIMEOUT:?}", path.display())
                        });
                    }
                    thread::sleep(Duration::from_millis(10));
                }
            }
        };
        let reader = stream.try_clone().context("clone the QMP socket")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                let Ok(value) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if tx.send((value, at)).is_err() {
                    break;
                }
            }
        });
        let mut qmp = Self {
            writer: stream,
            lines: rx,
            events: Vec::new(),
        };
        let (greeting, _) = qmp.next(READY_TIMEOUT).context("QMP greeting")?;
        if greeting.get("QMP").is_none() {
            bail!("unexpected QMP greeting {greeting}");
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// The next message, at most `timeout` from now.
    fn next(&mut self, timeout: Duration) -> anyhow::Result<(Value, Instant)> {
        match self.lines.recv_timeout(timeout) {
            Ok(message) => Ok(message),
            Err(RecvTimeoutError::Timeout) => bail!("no QMP message within {timeout:?}"),
            Err(RecvTimeoutError::Disconnected) => bail!("the QMP connection closed"),
        }
    }

    /// Sends a command and waits for its reply; events meanwhile are kept. Returns the
    /// `return` value and the time the reply arrived.
    fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<(Value, Instant)> {
        let message = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{message}").with_context(|| format!("send QMP {command}"))?;
        let deadline = Instant::now() + QMP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (value, at) = self
                .next(left)
                .with_context(|| format!("reply to QMP {command}"))?;
            if let Some(result) = value.get("return") {
                return Ok((result.clone(), at));
            }
            if let Some(error) = value.get("error") {
                bail!("QMP {command} failed: {error}");
            }
            if value.get("event").is_some() {
                self.events.push((value, at));
            }
        }
    }

    /// Waits for the event `name` (also among those kept), at most `timeout`; fails on
    /// `BLOCK_JOB_ERROR` or on a `BLOCK_JOB_COMPLETED`/`BLOCK_JOB_CANCELLED` that is not
    /// awaited. Returns the event and its arrival time.
    fn wait_event(&mut self, name: &str, timeout: Duration) -> anyhow::Result<(Value, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.events.iter().position(|(e, _)| e["event"] == name) {
                return Ok(self.events.remove(at));
            }
            if let Some((bad, _)) = self.events.iter().find(|(e, _)| {
                matches!(
                    e["event"].as_str(),
                    Some("BLOCK_JOB_ERROR" | "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED")
                )
            }) {
                bail!("waiting for {name}, got {bad}");
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let (value, at) = self
                .next(left)
                .with_context(|| format!("waiting for QMP event {name}"))?;
            if value.get("event").is_some() {
                self.events.push((value, at));
            }
        }
    }
}

/// `qemu-storage-daemon` serving `image` as node `node` over NBD at `nbd`, with its monitor
/// at `qmp`.
fn storage_daemon(image: &Path, node: &str, direct: bool, nbd: &Path, qmp: &Path) -> Command {
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name={node}-file,filename={},cache.direct={}",
            image.display(),
            if direct { "on" } else { "off" }
        ))
        .arg("--blockdev")
        .arg(format!("driver=raw,node-name={node},file={node}-file"))
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", nbd.display()))
        .arg("--export")
        .arg(format!(
            "type=nbd,id=exp0,node-name={node},name={DISK},writable=on"
        ))
        .arg("--chardev")
        .arg(format!(
            "socket,id=qmp,path={},server=on,wait=off",
            qmp.display()
        ))
        .arg("--monitor")
        .arg("chardev=qmp");
    cmd
}

/// A started `qemu-storage-daemon` and its QMP connection.
struct Daemon {
    /// The process.
    guard: Guard,
    /// Its stderr.
    log: LineWatcher,
    /// Its monitor, capabilities negotiated.
    qmp: Qmp,
}

impl Daemon {
    /// Spawns `cmd` and connects to its monitor at `qmp` (which is up only once the daemon
    /// has processed its options, so its NBD export listens too).
    fn start(name: &str, mut cmd: Command, qmp: &Path) -> anyhow::Result<Self> {
        let mut guard = Guard::spawn(name, &mut cmd, Stdio::piped())?;
        let mut log = LineWatcher::new(
            guard
                .child_mut()
                .stderr
                .take()
                .with_context(|| format!("{name} stderr"))?,
        );
        let qmp = Qmp::connect(qmp, &mut guard, &mut log).with_context(|| name.to_owned())?;
        Ok(Self { guard, log, qmp })
    }
}

/// One run of QEMU's mirror in `copy_mode` on the image of repetition `rep`.
pub(crate) fn run_one(bench: &Bench<'_>, rep: u32, copy_mode: &str) -> anyhow::Result<QemuRecord> {
    let args = bench.args;
    let dir = &bench.dir;
    bench.clean()?;
    let source = dir.join("src.img");
    let target = dir.join("dst.img");
    let size_bytes = bench.gen_image(rep)?;
    fs::File::create(&target)
        .and_then(|f| f.set_len(size_bytes))
        .with_context(|| format!("create {}", target.display()))?;
    let caches_dropped = process::drop_caches();

    let dst_nbd = dir.join("dst.nbd");
    let mut dst = Daemon::start(
        "qemu-storage-daemon (target)",
        storage_daemon(
            &target,
            "dst",
            args.qemu_target_cache == "none",
            &dst_nbd,
            &dir.join("dst.qmp"),
        ),
        &dir.join("dst.qmp"),
    )?;
    let mut src = Daemon::start(
        "qemu-storage-daemon (source)",
        storage_daemon(
            &source,
            "src",
            args.cache == "none",
            &dir.join("src.nbd"),
            &dir.join("src.qmp"),
        ),
        &dir.join("src.qmp"),
    )?;
    let (mut fio, mut fio_log) = bench.start_guest(size_bytes)?;

    let steps = (|| -> anyhow::Result<Steps> {
        let qmp = &mut src.qmp;
        qmp.execute(
            "blockdev-add",
            json!({
                "driver": "nbd",
                "node-name": "tgt",
                "server": {"type": "unix", "path": dst_nbd.display().to_string()},
                "export": DISK,
            }),
        )?;
        let t0_ms = now_unix_ms();
        let t0 = Instant::now();
        qmp.execute(
            "blockdev-mirror",
            json!({
                "job-id": JOB,
                "device": "src",
                "target": "tgt",
                "sync": "full",
                "copy-mode": copy_mode,
            }),
        )?;
        let (_, ready_at) =
            qmp.wait_event("BLOCK_JOB_READY", Duration::from_secs(CONVERGE_TIMEOUT_S))?;
        let converge_s = ready_at.duration_since(t0).as_secs_f64();
        // The guest keeps writing, then stops (a VMM pauses the VM); fio writes its logs.
        thread::sleep(AFTER_CONVERGED);
        if fio.interrupt(FIO_EXIT_TIMEOUT)?.is_none() {
            bail!("fio did not exit within {FIO_EXIT_TIMEOUT:?} of SIGINT");
        }
        let complete = Instant::now();
        qmp.execute("block-job-complete", json!({"device": JOB}))?;
        let (done, done_at) = qmp.wait_event("BLOCK_JOB_COMPLETED", QMP_TIMEOUT)?;
        if let Some(error) = done["data"].get("error") {
            bail!("the mirror job failed: {error}");
        }
        Ok(Steps {
            t0_ms,
            t1_ms: t0_ms + converge_s * 1e3,
            converge_s,
            total_s: done_at.duration_since(t0).as_secs_f64(),
            downtime_ms: done_at.duration_since(complete).as_secs_f64() * 1e3,
        })
    })();
    let steps = match steps {
        Ok(steps) => steps,
        Err(e) => {
            src.log.collect();
            dst.log.collect();
            fio_log.collect();
            return Err(e.context(format!(
                "QEMU ({copy_mode}) repetition {rep} failed\n--- source daemon:\n{}\n--- target daemon:\n{}\n--- fio:\n{}",
                src.log.tail(),
                dst.log.tail(),
                fio_log.tail()
            )));
        }
    };

    // Daemons down (they flush), then the independent check.
    drop(src.qmp);
    src.guard.stop(DAEMON_EXIT_TIMEOUT)?;
    drop(dst.qmp);
    dst.guard.stop(DAEMON_EXIT_TIMEOUT)?;
    let target_equal = process::images_equal(&source, &target)?;
    if !target_equal {
        bail!(
            "QEMU ({copy_mode}) repetition {rep}: qemu-img compare says {} differs from {} (kept for inspection)",
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
    } = bench.guest(steps.t0_ms, steps.t1_ms)?;
    let record = QemuRecord {
        rep,
        copy_mode: copy_mode.to_owned(),
        caches_dropped,
        total_s: steps.total_s,
        converge_s: steps.converge_s,
        downtime_ms: steps.downtime_ms,
        during_vs_intended: args.intended().map(|rate| during.mib_s / rate),
        during_vs_before: (before.mib_s > 0.0).then(|| during.mib_s / before.mib_s),
        before,
        during,
        fio_bytes_written,
        timeline_mib_s,
        migrate_at_s,
        target_equal,
    };
    bench.keep_logs(&format!("qemu-{copy_mode}-rep-{rep}"))?;
    bench.clean()?;
    Ok(record)
}

/// The measured points of one QEMU run.
struct Steps {
    /// `blockdev-mirror` sent, Unix ms.
    t0_ms: f64,
    /// `BLOCK_JOB_READY` arrived, Unix ms.
    t1_ms: f64,
    /// `blockdev-mirror` → `BLOCK_JOB_READY`, s.
    converge_s: f64,
    /// `blockdev-mirror` → `BLOCK_JOB_COMPLETED`, s.
    total_s: f64,
    /// `block-job-complete` → `BLOCK_JOB_COMPLETED`, ms.
    downtime_ms: f64,
}

/// The quantities Tern's and QEMU's runs share (as in their records).
struct View<'a> {
    total_s: f64,
    converge_s: f64,
    downtime_ms: f64,
    before: &'a Window,
    during: &'a Window,
    during_vs_intended: Option<f64>,
    /// Target equal to source (Tern: and its digests matched).
    equal: bool,
}

impl<'a> From<&'a RunRecord> for View<'a> {
    fn from(r: &'a RunRecord) -> Self {
        Self {
            total_s: r.total_s,
            converge_s: r.converge_s,
            downtime_ms: r.downtime_ms,
            before: &r.before,
            during: &r.during,
            during_vs_intended: r.during_vs_intended,
            equal: r.verified && r.target_equal,
        }
    }
}

impl<'a> From<&'a QemuRecord> for View<'a> {
    fn from(r: &'a QemuRecord) -> Self {
        Self {
            total_s: r.total_s,
            converge_s: r.converge_s,
            downtime_ms: r.downtime_ms,
            before: &r.before,
            during: &r.during,
            during_vs_intended: r.during_vs_intended,
            equal: r.target_equal,
        }
    }
}

/// A quantity of the comparison: its name, decimals, and how to read it from a run.
type Quantity = (&'static str, usize, fn(&View<'_>) -> Option<f64>);

/// The quantities compared, in report order.
const QUANTITIES: [Quantity; 10] = [
    ("total time (s)", 2, |v| Some(v.total_s)),
    ("time to converge / READY (s)", 2, |v| Some(v.converge_s)),
    ("storage downtime (ms)", 1, |v| Some(v.downtime_ms)),
    ("guest MiB/s before", 1, |v| Some(v.before.mib_s)),
    ("guest MiB/s during", 1, |v| Some(v.during.mib_s)),
    ("during / intended rate", 2, |v| v.during_vs_intended),
    ("write p50 before (µs)", 0, |v| v.before.p50_us),
    ("write p50 during (µs)", 0, |v| v.during.p50_us),
    ("write p99 before (µs)", 0, |v| v.before.p99_us),
    ("write p99 during (µs)", 0, |v| v.during.p99_us),
];

/// The summaries of one system's runs.
#[derive(Clone, Debug, Serialize)]
struct SystemSummary {
    /// Which system.
    system: String,
    /// Runs.
    runs: usize,
    /// Every run's target equal to its source (Tern: and verified).
    all_equal: bool,
    /// Per quantity, in [`QUANTITIES`] order.
    quantities: Vec<(&'static str, Option<Summary>)>,
}

fn summarize_system(system: String, views: &[View<'_>]) -> SystemSummary {
    SystemSummary {
        system,
        runs: views.len(),
        all_equal: views.iter().all(|v| v.equal),
        quantities: QUANTITIES
            .iter()
            .map(|(name, _, get)| {
                let values: Vec<f64> = views.iter().filter_map(get).collect();
                (*name, summarize(&values))
            })
            .collect(),
    }
}

/// A ratio of two medians.
#[derive(Clone, Debug, Serialize)]
struct Ratio {
    /// What is divided by what.
    name: String,
    /// The ratio, if both medians exist.
    value: Option<f64>,
}

/// Writes and prints the comparison of Tern's runs with QEMU's (`nbd-CASE-vs-qemu.md` and
/// `.json` in `--out`).
pub(crate) fn report(
    args: &NbdArgs,
    config: &NbdConfig,
    tern_runs: &[RunRecord],
    qemu_runs: &[QemuRecord],
) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let qemu_version = run_timed(
        "qemu-storage-daemon --version",
        Command::new("qemu-storage-daemon").arg("--version"),
        Duration::from_secs(10),
    )?
    .check("qemu-storage-daemon --version")?
    .stdout
    .lines()
    .next()
    .unwrap_or_default()
    .to_owned();
    let tern_label = format!("Tern ({})", config.mode);
    let mut systems = vec![summarize_system(
        tern_label.clone(),
        &tern_runs.iter().map(View::from).collect::<Vec<_>>(),
    )];
    for mode in MODES {
        let views: Vec<View<'_>> = qemu_runs
            .iter()
            .filter(|r| r.copy_mode == mode)
            .map(View::from)
            .collect();
        systems.push(summarize_system(format!("QEMU {mode}"), &views));
    }
    let median = |system: usize, quantity: usize| {
        systems[system].quantities[quantity]
            .1
            .as_ref()
            .map(|s| s.median)
    };
    let mut ratios = Vec::new();
    for (q, what) in [
        (0, "total time"),
        (1, "time to converge"),
        (2, "downtime"),
        (4, "guest MiB/s during"),
        (9, "write p99 during"),
    ] {
        for (s, mode) in MODES.iter().enumerate() {
            ratios.push(Ratio {
                name: format!("{what}: {tern_label} / QEMU {mode}"),
                value: median(0, q)
                    .zip(median(s + 1, q))
                    .filter(|(_, qemu)| *qemu > 0.0)
                    .map(|(tern, qemu)| tern / qemu),
            });
        }
    }

    let mut out = String::new();
    let rate = match config.rate_mib_s {
        Some(rate) => format!("{rate} MiB/s"),
        None => "unpaced".to_owned(),
    };
    let _ = writeln!(
        out,
        "\n# tern-bench nbd --peer qemu: Tern vs QEMU's mirror, same fio guest {rate} QD{}\n",
        config.queue_depth
    );
    let _ = writeln!(
        out,
        "Image: {:.0} MiB, mix `{}`, seed = repetition; {} repetition(s), each running Tern, \
         then QEMU background, then QEMU write-blocking on a fresh image of the same seed. \
         Page cache of the source: `tern export --cache {}`, QEMU source cache.direct={}; \
         target: `tern serve` (O_DIRECT), QEMU target cache.direct={}.  ",
        crate::nbd::mib(config.size_bytes),
        config.mix,
        config.reps,
        config.cache,
        if config.cache == "none" { "on" } else { "off" },
        if args.qemu_target_cache == "none" {
            "on"
        } else {
            "off"
        },
    );
    let _ = writeln!(out, "QEMU: {qemu_version}. Guest: `{}`.\n", config.fio_cmd);

    let _ = writeln!(
        out,
        "| rep | system | total s | converge s | downtime ms | MiB/s before → during | during / intended | p50 µs before → during | p99 µs before → during | target = source |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    let mut rows: Vec<(u32, String, View<'_>)> = tern_runs
        .iter()
        .map(|r| (r.rep, tern_label.clone(), View::from(r)))
        .collect();
    rows.extend(
        qemu_runs
            .iter()
            .map(|r| (r.rep, format!("QEMU {}", r.copy_mode), View::from(r))),
    );
    rows.sort_by_key(|(rep, _, _)| *rep);
    for (rep, system, v) in &rows {
        let _ = writeln!(
            out,
            "| {rep} | {system} | {:.2} | {:.2} | {:.1} | {:.1} → {:.1} | {} | {} → {} | {} → {} | {} |",
            v.total_s,
            v.converge_s,
            v.downtime_ms,
            v.before.mib_s,
            v.during.mib_s,
            opt(v.during_vs_intended, 2),
            opt(v.before.p50_us, 0),
            opt(v.during.p50_us, 0),
            opt(v.before.p99_us, 0),
            opt(v.during.p99_us, 0),
            if v.equal { "yes" } else { "**NO**" },
        );
    }

    let _ = write!(out, "\n| median (min–max) |");
    for s in &systems {
        let _ = write!(out, " {} |", s.system);
    }
    let _ = writeln!(out, "\n|---|{}", "---:|".repeat(systems.len()));
    for (q, (name, digits, _)) in QUANTITIES.iter().enumerate() {
        let _ = write!(out, "| {name} |");
        for s in &systems {
            let cell = match &s.quantities[q].1 {
                Some(v) => format!(
                    "{:.d$} ({:.d$}–{:.d$})",
                    v.median,
                    v.min,
                    v.max,
                    d = *digits
                ),
                None => "–".to_owned(),
            };
            let _ = write!(out, " {cell} |");
        }
        let _ = writeln!(out);
    }
    let _ = write!(out, "| target = source, every run |");
    for s in &systems {
        let _ = write!(out, " {} |", if s.all_equal { "yes" } else { "**NO**" });
    }
    let _ = writeln!(out, "\n\n| ratio of medians | value |\n|---|---:|");
    for r in &ratios {
        let _ = writeln!(out, "| {} | {} |", r.name, opt(r.value, 2));
    }
    let _ = writeln!(
        out,
        "\nQEMU: `blockdev-add` of an NBD client node for the target, `blockdev-mirror` \
         sync=full (t0), `BLOCK_JOB_READY` (t1, \"converge\"; \"during\" = t0 → t1), {} s more \
         of guest writes, fio stopped with SIGINT, `block-job-complete`; downtime is from that \
         command to `BLOCK_JOB_COMPLETED`, total time from `blockdev-mirror` to it. Tern: as in \
         the report above (its total is the daemon's `total-time-s`, `migrate` → commit). \
         Tern's \"target = source\" also requires its digests to have matched.",
        AFTER_CONVERGED.as_secs()
    );

    let stem = format!("nbd-{}-vs-qemu", args.case_name());
    let json_path = args.out.join(format!("{stem}.json"));
    let report_path = args.out.join(format!("{stem}.md"));
    let json = json!({
        "scenario": "nbd-vs-qemu",
        "config": config,
        "qemu_version": qemu_version,
        "qemu_target_cache": args.qemu_target_cache,
        "tern_runs": tern_runs,
        "qemu_runs": qemu_runs,
        "summary": systems,
        "ratios": ratios,
    });
    fs::write(&json_path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("write {}", json_path.display()))?;
    fs::write(&report_path, &out).with_context(|| format!("write {}", report_path.display()))?;
    print!("{out}");
    eprintln!(
        "tern-bench: wrote {} and {}",
        report_path.display(),
        json_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::storage_daemon;

    #[test]
    fn storage_daemon_exports_the_raw_node_over_nbd_with_a_qmp_monitor() {
        let cmd = storage_daemon(
            Path::new("/d/src.img"),
            "src",
            false,
            Path::new("/d/src.nbd"),
            Path::new("/d/src.qmp"),
        );
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "--blockdev",
                "driver=file,node-name=src-file,filename=/d/src.img,cache.direct=off",
                "--blockdev",
                "driver=raw,node-name=src,file=src-file",
                "--nbd-server",
                "addr.type=unix,addr.path=/d/src.nbd",
                "--export",
                "type=nbd,id=exp0,node-name=src,name=disk,writable=on",
                "--chardev",
                "socket,id=qmp,path=/d/src.qmp,server=on,wait=off",
                "--monitor",
                "chardev=qmp",
            ]
        );
    }
}
