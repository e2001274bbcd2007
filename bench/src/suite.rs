//! `tern-bench suite`: the standard suite (`bench/suite.toml`) in one command — the hardware
//! limits, then every case with Tern and its peers interleaved — and one Markdown report
//! that checks the performance targets (README's "Performance").

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::case::{Case, SuiteFile, System};
use crate::compare::{self, CaseSummary};
use crate::copy::default_tern;
use crate::nbd::{self, Env, mib};
use crate::process::{self, run_timed};
use crate::report::opt;
use crate::stats::{Summary, summarize};

/// Arguments of `tern-bench suite`.
#[derive(clap::Args, Debug)]
pub(crate) struct SuiteArgs {
    /// The suite file.
    #[arg(long, default_value = "bench/suite.toml")]
    config: PathBuf,
    /// Directory for the report (`report.md`), the raw results (`suite.json`, `CASE.json`)
    /// and the charts.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Scratch directory for images (not tmpfs: the targets use O_DIRECT).
    #[arg(long, default_value = "tern-bench-work")]
    dir: PathBuf,
    /// The `tern` binary; by default the one next to this binary, else `tern` on PATH.
    #[arg(long)]
    tern: Option<PathBuf>,
    /// Run only these cases (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Override every case's repetitions (a quick look; the targets want ≥ 5).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    reps: Option<u32>,
    /// Override every case's image size (a quick look; the targets are for 2 GiB).
    #[arg(long)]
    size: Option<String>,
    /// Rounds of each hardware measurement (0: skip them).
    #[arg(long, default_value_t = 3)]
    hardware_rounds: u32,
    /// Keep fio's logs of every run in the scratch directory.
    #[arg(long)]
    keep_logs: bool,
}

/// The hardware's limits on this machine, measured in the same run.
#[derive(Clone, Debug, Serialize)]
struct Hardware {
    /// O_DIRECT sequential read of a 2 GiB file, MiB/s.
    direct_read_mib_s: Option<Summary>,
    /// O_DIRECT sequential write of 2 GiB with a final fsync, MiB/s.
    direct_write_mib_s: Option<Summary>,
    /// One TCP stream over loopback, MiB/s.
    loopback_tcp_mib_s: Option<Summary>,
}

/// A case's outcome in the suite.
#[derive(Clone, Debug, Serialize)]
struct CaseOutcome {
    /// The case as run.
    case: Case,
    /// Its summary, or why it failed.
    summary: Result<CaseSummary, String>,
}

/// One row of the targets table.
#[derive(Clone, Debug, Serialize)]
struct TargetRow {
    /// The case it is measured in.
    case: &'static str,
    /// The target, in words.
    target: &'static str,
    /// What was measured.
    measured: String,
    /// Met, missed, or not measured (`None`).
    met: Option<bool>,
}

/// Runs the suite.
pub(crate) fn run(args: &SuiteArgs) -> anyhow::Result<()> {
    let text = fs::read_to_string(&args.config)
        .with_context(|| format!("read {}", args.config.display()))?;
    let mut suite = SuiteFile::parse(&text).with_context(|| args.config.display().to_string())?;
    if !args.only.is_empty() {
        for name in &args.only {
            if !suite.cases.iter().any(|c| &c.name == name) {
                anyhow::bail!("--only {name}: no such case in {}", args.config.display());
            }
        }
        suite.cases.retain(|c| args.only.contains(&c.name));
    }
    for case in &mut suite.cases {
        if let Some(reps) = args.reps {
            case.reps = reps;
        }
        if let Some(size) = &args.size {
            case.size = size.clone();
        }
    }
    let tern = args.tern.clone().unwrap_or_else(default_tern);
    let mut systems: Vec<System> = suite
        .cases
        .iter()
        .flat_map(|c| c.systems.iter().copied())
        .collect();
    systems.dedup();
    let env = Env::prepare(&tern, &args.dir, &systems)?;
    fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let started = Instant::now();

    let hardware = measure_hardware(&env, args.hardware_rounds)?;
    let mut outcomes = Vec::new();
    for case in &suite.cases {
        eprintln!("tern-bench: case {} ({} repetitions)", case.name, case.reps);
        let summary = nbd::run_case(&env, case, args.keep_logs)
            .and_then(|results| compare::write(&results, &args.out).map(|(s, _)| s))
            .map_err(|e| {
                eprintln!("tern-bench: case {} failed: {e:#}", case.name);
                format!("{e:#}")
            });
        outcomes.push(CaseOutcome {
            case: case.clone(),
            summary,
        });
    }
    let targets = targets(&outcomes);
    let report = render(
        args,
        &env,
        &hardware,
        &outcomes,
        &targets,
        started.elapsed(),
    );
    let report_path = args.out.join("report.md");
    fs::write(&report_path, &report).with_context(|| format!("write {}", report_path.display()))?;
    let json_path = args.out.join("suite.json");
    let json = serde_json::json!({
        "hardware": hardware,
        "cases": outcomes,
        "targets": targets,
        "duration_s": started.elapsed().as_secs_f64(),
    });
    fs::write(&json_path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("write {}", json_path.display()))?;
    print!("{report}");
    eprintln!(
        "tern-bench: wrote {} and {}",
        report_path.display(),
        json_path.display()
    );
    if outcomes.iter().any(|o| o.summary.is_err()) {
        anyhow::bail!("some cases failed (see the report)");
    }
    Ok(())
}

/// Measures the disk's O_DIRECT read and write rates and one loopback TCP stream,
/// `rounds` times each, on 2 GiB.
fn measure_hardware(env: &Env, rounds: u32) -> anyhow::Result<Hardware> {
    const BYTES: u64 = 2 << 30;
    let mut read = Vec::new();
    let mut write = Vec::new();
    let mut tcp = Vec::new();
    let file = env.dir.join("hardware.img");
    for round in 1..=rounds {
        eprintln!("tern-bench: hardware limits, round {round}/{rounds}");
        let _ = fs::remove_file(&file);
        let done = run_timed(
            "dd (O_DIRECT write)",
            Command::new("dd")
                .arg("if=/dev/zero")
                .arg(format!("of={}", file.display()))
                .args(["bs=1M", "count=2048", "oflag=direct", "conv=fsync"]),
            Duration::from_secs(600),
        )?
        .check("dd (O_DIRECT write)")?;
        write.push(mib(BYTES) / done.elapsed.as_secs_f64());
        process::drop_caches();
        let done = run_timed(
            "dd (O_DIRECT read)",
            Command::new("dd")
                .arg(format!("if={}", file.display()))
                .args(["of=/dev/null", "bs=1M", "iflag=direct"]),
            Duration::from_secs(600),
        )?
        .check("dd (O_DIRECT read)")?;
        read.push(mib(BYTES) / done.elapsed.as_secs_f64());
        tcp.push(loopback_tcp(BYTES)?);
    }
    let _ = fs::remove_file(&file);
    Ok(Hardware {
        direct_read_mib_s: summarize(&read),
        direct_write_mib_s: summarize(&write),
        loopback_tcp_mib_s: summarize(&tcp),
    })
}

/// Sends `bytes` over one loopback TCP connection in 1 MiB writes; MiB/s.
fn loopback_tcp(bytes: u64) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut stream, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            match stream.read(&mut buf)? {
                0 => return Ok(total),
                n => total += n as u64,
            }
        }
    });
    let start = Instant::now();
    let mut stream = TcpStream::connect(addr).context("connect")?;
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..bytes / chunk.len() as u64 {
        stream.write_all(&chunk)?;
    }
    drop(stream);
    let received = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the loopback reader panicked"))??;
    anyhow::ensure!(received == bytes, "received {received} of {bytes} bytes");
    Ok(mib(bytes) / start.elapsed().as_secs_f64())
}

/// The targets of issue 5, checked against the cases of the standard suite (by name).
fn targets(outcomes: &[CaseOutcome]) -> Vec<TargetRow> {
    let summary = |name: &str| {
        outcomes
            .iter()
            .find(|o| o.case.name == name)
            .and_then(|o| o.summary.as_ref().ok())
    };
    let qemu = |write_blocking, tls| System::Qemu {
        write_blocking,
        tls,
    };
    let (bg, wb, bg_tls) = (qemu(false, false), qemu(true, false), qemu(false, true));
    let mut rows = Vec::new();
    let mut ratio_row = |case: &'static str,
                         target: &'static str,
                         quantity: &str,
                         peer: System,
                         at_most: Option<f64>,
                         at_least: Option<f64>| {
        let value = summary(case).and_then(|s| s.ratio(quantity, System::TERN, peer));
        rows.push(TargetRow {
            case,
            target,
            measured: match value {
                Some(v) => format!("{v:.2} × {peer}"),
                None => "not measured".to_owned(),
            },
            met: value.and_then(|v| match (at_most, at_least) {
                (Some(max), _) => Some(v <= max),
                (_, Some(min)) => Some(v >= min),
                _ => None,
            }),
        });
    };
    ratio_row(
        "idle-loopback",
        "idle guest, loopback: total time ≤ 1.0 × QEMU background",
        "total time (s)",
        bg,
        Some(1.0),
        None,
    );
    ratio_row(
        "idle-loopback",
        "idle guest, loopback: total time ≤ 0.8 × QEMU background with NBD TLS",
        "total time (s)",
        bg_tls,
        Some(0.8),
        None,
    );
    ratio_row(
        "qd1-32mibs",
        "32 MiB/s writer QD1: downtime ≤ 0.5 × QEMU background",
        "storage downtime (ms)",
        bg,
        Some(0.5),
        None,
    );
    ratio_row(
        "qd1-32mibs",
        "32 MiB/s writer QD1: downtime ≤ 0.5 × QEMU write-blocking",
        "storage downtime (ms)",
        wb,
        Some(0.5),
        None,
    );
    ratio_row(
        "qd1-32mibs",
        "32 MiB/s writer QD1: guest write rate during ≥ 3 × under QEMU background",
        "guest MiB/s during",
        bg,
        None,
        Some(3.0),
    );
    ratio_row(
        "qd8-unpaced",
        "unpaced writer QD8: Tern auto converges, total time ≤ QEMU write-blocking",
        "total time (s)",
        wb,
        Some(1.0),
        None,
    );
    ratio_row(
        "link-1gbit",
        "1 Gbit/s link: total time ≤ 0.75 × QEMU",
        "total time (s)",
        bg,
        Some(0.75),
        None,
    );
    for tern in [System::TERN, System::Tern { bbr: true }] {
        let case = "wan-100mbit-80ms";
        let ran = summary(case).and_then(|s| s.system(tern));
        let ratio = summary(case).and_then(|s| s.ratio("total time (s)", tern, bg));
        rows.push(TargetRow {
            case,
            target: if tern == System::TERN {
                "100 Mbit/s, 80 ms RTT, 0.1 % loss: Tern completes (ratio reported)"
            } else {
                "the same with `congestion=bbr`"
            },
            measured: match (ran, ratio) {
                (Some(_), Some(v)) => format!("completed; total time {v:.2} × {bg}"),
                (Some(_), None) => "completed".to_owned(),
                (None, _) => "not measured".to_owned(),
            },
            met: ran.map(|t| t.runs > 0 && t.all_equal),
        });
    }
    let tern_median = |case: &str, quantity: &str| {
        summary(case)
            .and_then(|s| s.system(System::TERN))
            .and_then(|t| t.median(quantity))
    };
    let cpu = tern_median("idle-loopback", "CPU both ends per GiB of disk (s)");
    rows.push(TargetRow {
        case: "idle-loopback",
        target: "CPU ≤ 1.5 s per GiB, both ends together, loopback",
        measured: opt(cpu, 2) + " s/GiB",
        met: cpu.map(|v| v <= 1.5),
    });
    for (case, target) in [
        (
            "idle-loopback",
            "peak RSS of each side ≤ 256 MiB, 2 GiB disk",
        ),
        (
            "sparse-64g",
            "peak RSS of each side ≤ 256 MiB, 64 GiB sparse disk",
        ),
    ] {
        let source = tern_median(case, "peak RSS, source (MiB)");
        let target_rss = tern_median(case, "peak RSS, target (MiB)");
        rows.push(TargetRow {
            case,
            target,
            measured: format!(
                "source {} MiB, target {} MiB",
                opt(source, 0),
                opt(target_rss, 0)
            ),
            met: source
                .zip(target_rss)
                .map(|(s, t)| s <= 256.0 && t <= 256.0),
        });
    }
    rows
}

/// The suite's Markdown report.
fn render(
    args: &SuiteArgs,
    env: &Env,
    hardware: &Hardware,
    outcomes: &[CaseOutcome],
    targets: &[TargetRow],
    took: Duration,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Tern benchmark suite\n");
    let _ = writeln!(
        out,
        "`tern-bench suite --config {}` on this machine ({} CPUs), {:.0} min. tern: `{}`; {}; \
         fio: {}. Medians (min–max) of each case's repetitions; Tern and its peers ran \
         interleaved on the same images.\n",
        args.config.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        took.as_secs_f64() / 60.0,
        env.tern.display(),
        env.qemu_version.as_deref().unwrap_or("no QEMU"),
        env.fio_version,
    );
    let _ = writeln!(
        out,
        "## Targets\n\n| case | target | measured | met |\n|---|---|---|---|"
    );
    for t in targets {
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {met} |",
            t.case, t.target, t.measured
        );
    }
    let summary_cell = |s: &Option<Summary>, unit: &str| match s {
        Some(s) => format!("{:.0} {unit} ({:.0}–{:.0})", s.median, s.min, s.max),
        None => "not measured".to_owned(),
    };
    let _ = writeln!(
        out,
        "\n## Hardware limits (same run)\n\n| what | median (min–max) |\n|---|---:|\n| O_DIRECT sequential read, 2 GiB | {} |\n| O_DIRECT sequential write + fsync, 2 GiB | {} |\n| one TCP stream over loopback, 2 GiB | {} |",
        summary_cell(&hardware.direct_read_mib_s, "MiB/s"),
        summary_cell(&hardware.direct_write_mib_s, "MiB/s"),
        summary_cell(&hardware.loopback_tcp_mib_s, "MiB/s"),
    );
    for outcome in outcomes {
        let case = &outcome.case;
        let _ = writeln!(
            out,
            "\n## {}\n\n{}; {}; {} of `{}`; {} repetitions. Details: [{}.md]({}.md).\n",
            case.name,
            case.writer.describe(),
            case.link.describe(),
            case.size,
            case.mix,
            case.reps,
            case.name,
            case.name
        );
        match &outcome.summary {
            Ok(summary) => {
                let _ = writeln!(out, "{}", compare::median_table(summary));
                for chart in &summary.charts {
                    let _ = writeln!(out, "![{chart}]({chart})");
                }
            }
            Err(e) => {
                let first = e.lines().next().unwrap_or_default();
                let _ = writeln!(out, "**Failed**: {first}");
            }
        }
    }
    out
}
