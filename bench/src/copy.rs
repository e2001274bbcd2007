//! The copy scenario: one seeded image copied over loopback by `qemu-img convert` into
//! `qemu-nbd`, and by `tern migrate` into `tern serve` (compression `auto` and `zstd`),
//! interleaved round by round so that drift of the machine hits every system alike, the order
//! rotating from round to round: on a virtual disk the host may still be writing back the
//! previous system's image, which would otherwise always slow the same successor.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::process::{self, Guard, LineWatcher, run_timed};

/// Mix of extent kinds of the generated image.
pub(crate) const MIX: &str = "random=50,hole=25,text=25";
/// Seed of the generated image.
pub(crate) const SEED: u64 = 1;
/// Bound on one copy (a stuck run is killed and reported as an error).
const COPY_TIMEOUT: Duration = Duration::from_secs(3600);
/// Bound on a server getting ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on `tern serve` exiting after the source finished.
const SERVE_EXIT_TIMEOUT: Duration = Duration::from_secs(120);
/// The `tern serve` log line that says it listens.
const SERVE_READY: &str = "waiting for the source";

/// Options of `tern-bench copy`.
#[derive(clap::Args, Debug)]
pub(crate) struct CopyArgs {
    /// Image size, as `tern gen-image --size` takes it (e.g. 2G, 256M).
    #[arg(long, default_value = "2G")]
    pub(crate) size: String,
    /// Rounds; each round runs every system once.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) runs: u32,
    /// Work directory for the images and identities (not tmpfs: the targets use O_DIRECT).
    #[arg(long, default_value = "tern-bench-work")]
    pub(crate) dir: PathBuf,
    /// The `tern` binary; by default the one next to this binary, else `tern` on PATH.
    #[arg(long)]
    pub(crate) tern: Option<PathBuf>,
    /// Where to write all raw runs and the summary as JSON.
    #[arg(long, default_value = "results.json")]
    pub(crate) out: PathBuf,
    /// Where to write the Markdown report (also printed on stdout).
    #[arg(long, default_value = "report.md")]
    pub(crate) report: PathBuf,
}

/// The systems compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum System {
    /// `qemu-img convert` into `qemu-nbd`.
    QemuImg,
    /// `tern migrate --compress auto` into `tern serve`.
    TernAuto,
    /// `tern migrate --compress zstd` into `tern serve`.
    TernZstd,
}

impl System {
    /// Every system, in the order each round runs them.
    pub(crate) const ALL: [System; 3] = [System::QemuImg, System::TernAuto, System::TernZstd];

    /// The name shown in the report.
    pub(crate) fn label(self) -> &'static str {
        match self {
            System::QemuImg => "qemu-img convert → qemu-nbd",
            System::TernAuto => "tern (compress auto)",
            System::TernZstd => "tern (compress zstd)",
        }
    }
}

/// The `tern migrate --json` summary line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct TernSummary {
    /// Virtual size copied.
    pub(crate) bytes_total: u64,
    /// Bytes that were not zero.
    pub(crate) bytes_data: u64,
    /// Bytes sent (after compression).
    pub(crate) bytes_wire: u64,
    /// Tern's own measure of the copy.
    pub(crate) duration_s: f64,
    /// Tern's own throughput.
    pub(crate) throughput_mib_s: f64,
    /// Whether Tern compared digests afterwards.
    pub(crate) verified: bool,
}

/// One copy by one system.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct RunRecord {
    /// Which system.
    pub(crate) system: System,
    /// Round, from 1.
    pub(crate) round: u32,
    /// Wall-clock seconds of the copying command (process start to exit).
    pub(crate) seconds: f64,
    /// Virtual size in MiB divided by `seconds`.
    pub(crate) mib_s: f64,
    /// Whether the page cache was dropped before this run.
    pub(crate) caches_dropped: bool,
    /// Whether the target held the source's bytes afterwards (checked outside the timing).
    pub(crate) target_equal: bool,
    /// Tern's JSON summary (Tern runs only).
    pub(crate) tern: Option<TernSummary>,
}

/// The set-up of a copy benchmark.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct CopyConfig {
    /// Virtual size of the image in bytes.
    pub(crate) size_bytes: u64,
    /// Rounds run.
    pub(crate) rounds: u32,
    /// `tern gen-image --mix`.
    pub(crate) mix: String,
    /// `tern gen-image --seed`.
    pub(crate) seed: u64,
    /// The `--aio` mode given to qemu-nbd.
    pub(crate) qemu_nbd_aio: String,
    /// The qemu-nbd command line (PORT and TARGET stand for the per-run values).
    pub(crate) qemu_nbd_cmd: String,
    /// The qemu-img command line (SRC and PORT stand for the per-run values).
    pub(crate) qemu_img_cmd: String,
    /// `qemu-img --version`, first line.
    pub(crate) qemu_version: String,
    /// The tern binary used.
    pub(crate) tern: String,
}

/// Everything one `tern-bench copy` measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct CopyResults {
    /// Set-up.
    pub(crate) config: CopyConfig,
    /// All runs, in the order they ran.
    pub(crate) runs: Vec<RunRecord>,
}

/// A `tern keygen` identity.
pub(crate) struct Identity {
    /// The identity directory (`--identity`).
    pub(crate) dir: PathBuf,
    /// Its certificate fingerprint, `sha256:…` (`--peer` on the other side).
    pub(crate) fingerprint: String,
}

/// Shared state of the runs.
struct Bench {
    tern: PathBuf,
    dir: PathBuf,
    source: PathBuf,
    size_bytes: u64,
    aio: &'static str,
    source_id: Identity,
    target_id: Identity,
}

/// Runs the scenario.
pub(crate) fn run(args: &CopyArgs) -> anyhow::Result<CopyResults> {
    let tern = match &args.tern {
        Some(path) => path.clone(),
        None => default_tern(),
    };
    fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    let qemu_version = qemu_version()?;

    let source = dir.join("source.img");
    eprintln!(
        "tern-bench: generating {} ({}, {MIX}, seed {SEED})",
        source.display(),
        args.size
    );
    run_timed(
        "tern gen-image",
        Command::new(&tern)
            .arg("gen-image")
            .arg("--out")
            .arg(&source)
            .args(["--size", &args.size, "--mix", MIX, "--seed"])
            .arg(SEED.to_string())
            .arg("--sync"),
        COPY_TIMEOUT,
    )?
    .check("tern gen-image")?;
    let size_bytes = fs::metadata(&source)?.len();

    let aio = pick_aio(&dir)?;
    eprintln!("tern-bench: qemu-nbd --aio={aio}");
    let bench = Bench {
        source_id: keygen(&tern, &dir.join("id-source"))?,
        target_id: keygen(&tern, &dir.join("id-target"))?,
        tern: tern.clone(),
        dir,
        source,
        size_bytes,
        aio,
    };

    let mut runs = Vec::new();
    for round in 1..=args.runs {
        for system in round_order(round) {
            eprintln!(
                "tern-bench: round {round}/{}: {}",
                args.runs,
                system.label()
            );
            let record = bench.run_one(system, round)?;
            eprintln!(
                "tern-bench:   {:.2} s, {:.1} MiB/s, target {}",
                record.seconds,
                record.mib_s,
                if record.target_equal {
                    "equal"
                } else {
                    "DIFFERS"
                }
            );
            runs.push(record);
        }
    }
    Ok(CopyResults {
        config: CopyConfig {
            size_bytes,
            rounds: args.runs,
            mix: MIX.to_owned(),
            seed: SEED,
            qemu_nbd_aio: aio.to_owned(),
            qemu_nbd_cmd: format!(
                "qemu-nbd -f raw -x disk -p PORT -b 127.0.0.1 -t --cache=none --aio={aio} TARGET"
            ),
            qemu_img_cmd: "qemu-img convert -W -m 8 -n -f raw -O raw SRC nbd://127.0.0.1:PORT/disk"
                .to_owned(),
            qemu_version,
            tern: tern.display().to_string(),
        },
        runs,
    })
}

/// `tern` next to this binary if it is there, else `tern` from PATH.
pub(crate) fn default_tern() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("tern")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("tern"))
}

fn qemu_version() -> anyhow::Result<String> {
    let done = run_timed(
        "qemu-img --version",
        Command::new("qemu-img").arg("--version"),
        Duration::from_secs(10),
    )?
    .check("qemu-img --version")?;
    Ok(done.stdout.lines().next().unwrap_or_default().to_owned())
}

/// Makes an identity in `dir` with `tern keygen` and reads the fingerprint it prints.
pub(crate) fn keygen(tern: &Path, dir: &Path) -> anyhow::Result<Identity> {
    let done = run_timed(
        "tern keygen",
        Command::new(tern).arg("keygen").arg("--out").arg(dir),
        Duration::from_secs(30),
    )?
    .check("tern keygen")?;
    let fingerprint = done
        .stdout
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .context("tern keygen printed no sha256: fingerprint")?
        .to_owned();
    Ok(Identity {
        dir: dir.to_owned(),
        fingerprint,
    })
}

/// The qemu-nbd command for `target` on `port`.
fn qemu_nbd(target: &Path, port: u16, aio: &str) -> Command {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "raw", "-x", "disk", "-b", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(["-t", "--cache=none"])
        .arg(format!("--aio={aio}"))
        .arg(target);
    cmd
}

/// `io_uring` if qemu-nbd serves with it in `dir`, else `native`.
fn pick_aio(dir: &Path) -> anyhow::Result<&'static str> {
    let probe = dir.join("aio-probe.img");
    create_raw(&probe, 1 << 20)?;
    let port = process::free_tcp_port()?;
    let works = match Guard::spawn(
        "qemu-nbd (io_uring probe)",
        &mut qemu_nbd(&probe, port, "io_uring"),
        Stdio::null(),
    ) {
        Ok(mut nbd) => {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let up = process::wait_for_tcp(addr, &mut nbd, Duration::from_secs(5)).is_ok();
            nbd.stop(Duration::from_secs(5))?;
            up
        }
        Err(_) => false,
    };
    let _ = fs::remove_file(&probe);
    Ok(if works { "io_uring" } else { "native" })
}

/// `qemu-img create -f raw PATH BYTES`.
fn create_raw(path: &Path, bytes: u64) -> anyhow::Result<()> {
    run_timed(
        "qemu-img create",
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(path)
            .arg(bytes.to_string()),
        Duration::from_secs(60),
    )?
    .check("qemu-img create")?;
    Ok(())
}

/// Removes `path` and Tern's `PATH.tern-incomplete` marker if they exist.
pub(crate) fn remove_target(path: &Path) -> anyhow::Result<()> {
    let mut marker = path.as_os_str().to_owned();
    marker.push(".tern-incomplete");
    for p in [path, Path::new(&marker)] {
        match fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", p.display())),
        }
    }
    Ok(())
}

impl Bench {
    fn run_one(&self, system: System, round: u32) -> anyhow::Result<RunRecord> {
        let target = self.dir.join(match system {
            System::QemuImg => "target-qemu.img",
            System::TernAuto | System::TernZstd => "target-tern.img",
        });
        remove_target(&target)?;
        let (seconds, tern, caches_dropped) = match system {
            System::QemuImg => self.qemu(&target)?,
            System::TernAuto => self.tern(&target, "auto")?,
            System::TernZstd => self.tern(&target, "zstd")?,
        };
        let target_equal = process::images_equal(&self.source, &target)?;
        remove_target(&target)?;
        Ok(RunRecord {
            system,
            round,
            seconds,
            mib_s: self.size_bytes as f64 / (1u64 << 20) as f64 / seconds,
            caches_dropped,
            target_equal,
            tern,
        })
    }

    /// One `qemu-img convert` into a fresh `qemu-nbd`; returns the seconds of the convert.
    fn qemu(&self, target: &Path) -> anyhow::Result<(f64, Option<TernSummary>, bool)> {
        create_raw(target, self.size_bytes)?;
        let port = process::free_tcp_port()?;
        let mut nbd = Guard::spawn(
            "qemu-nbd",
            &mut qemu_nbd(target, port, self.aio),
            Stdio::inherit(),
        )?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        process::wait_for_tcp(addr, &mut nbd, READY_TIMEOUT)?;
        let dropped = process::drop_caches();
        let done = run_timed(
            "qemu-img convert",
            Command::new("qemu-img")
                .args(["convert", "-W", "-m", "8", "-n", "-f", "raw", "-O", "raw"])
                .arg(&self.source)
                .arg(format!("nbd://127.0.0.1:{port}/disk")),
            COPY_TIMEOUT,
        )?
        .check("qemu-img convert")?;
        // qemu-nbd runs with -t (persistent), so it is stopped rather than awaited.
        nbd.stop(Duration::from_secs(30))?;
        Ok((done.elapsed.as_secs_f64(), None, dropped))
    }

    /// One `tern migrate --compress MODE` into a fresh `tern serve`; returns the seconds of
    /// the migrate command and its JSON summary.
    fn tern(&self, target: &Path, mode: &str) -> anyhow::Result<(f64, Option<TernSummary>, bool)> {
        let port = process::free_udp_port()?;
        let addr = format!("127.0.0.1:{port}");
        let mut serve = Guard::spawn(
            "tern serve",
            Command::new(&self.tern)
                .env("NO_COLOR", "1")
                .args([
                    "--log-format",
                    "text",
                    "serve",
                    "--listen",
                    &addr,
                    "--image",
                ])
                .arg(target)
                .arg("--identity")
                .arg(&self.target_id.dir)
                .args(["--peer", &self.source_id.fingerprint]),
            Stdio::piped(),
        )?;
        let stderr = serve
            .child_mut()
            .stderr
            .take()
            .context("tern serve stderr")?;
        let mut log = LineWatcher::new(stderr);
        log.wait_for(SERVE_READY, READY_TIMEOUT)
            .context("tern serve did not get ready")?;
        let dropped = process::drop_caches();
        let done = run_timed(
            "tern migrate",
            Command::new(&self.tern)
                .args(["migrate", "--image"])
                .arg(&self.source)
                .args(["--to", &addr, "--identity"])
                .arg(&self.source_id.dir)
                .args(["--peer", &self.target_id.fingerprint])
                .args(["--compress", mode, "--json"]),
            COPY_TIMEOUT,
        )?
        .check("tern migrate")?;
        let status = serve.wait_timeout(SERVE_EXIT_TIMEOUT)?;
        log.collect();
        match status {
            Some(s) if s.success() => {}
            Some(s) => bail!("tern serve exited with {s}: {}", log.tail()),
            None => bail!(
                "tern serve still running {SERVE_EXIT_TIMEOUT:?} after the source finished: {}",
                log.tail()
            ),
        }
        let line = done
            .stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .context("tern migrate --json printed nothing")?;
        let summary: TernSummary = serde_json::from_str(line)
            .with_context(|| format!("parse tern migrate --json output {line:?}"))?;
        Ok((done.elapsed.as_secs_f64(), Some(summary), dropped))
    }
}

/// The systems of round `round` (from 1): [`System::ALL`] rotated by one per round, so each
/// system runs first, second and third equally often over every three rounds.
fn round_order(round: u32) -> [System; 3] {
    let mut order = System::ALL;
    let places = order.len();
    order.rotate_left((round.saturating_sub(1) as usize) % places);
    order
}

#[cfg(test)]
mod round_order_tests {
    use super::*;

    #[test]
    fn each_system_takes_each_place_once_in_three_rounds() {
        for (place, _) in System::ALL.iter().enumerate() {
            let mut seen: Vec<System> = (1..=3).map(|r| round_order(r)[place]).collect();
            seen.sort_by_key(|s| System::ALL.iter().position(|a| a == s));
            assert_eq!(seen, System::ALL, "place {place}");
        }
        assert_eq!(round_order(1), System::ALL);
        assert_eq!(round_order(4), System::ALL);
    }
}
