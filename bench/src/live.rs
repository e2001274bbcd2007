//! The live-migration scenario: `tern demo` (a guest writing through `TrackedDisk` while the
//! disk moves over loopback QUIC) repeated, with the page cache dropped before each run, and
//! the storage downtime and the guest's achieved write rate reported as medians.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::stats::{Summary, summarize};

/// Arguments of `tern-bench live`.
#[derive(clap::Args, Debug)]
pub(crate) struct LiveArgs {
    /// Image size, as `tern demo --size` takes it.
    #[arg(long, default_value = "2G")]
    size: String,
    /// Runs of each case.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The paced guest's write rate, MiB/s (queue depth 1).
    #[arg(long, default_value_t = 32.0)]
    rate: f64,
    /// Storage downtime budget passed to `tern demo` (the engine's default is 50 ms).
    #[arg(long, default_value_t = 50)]
    max_downtime_ms: u64,
    /// The stand-in VMM's memory pre-copy after convergence, passed to `tern demo` (0 pauses
    /// the guest the moment storage converges).
    #[arg(long, default_value_t = 300)]
    memory_precopy_ms: u64,
    /// Work directory (not tmpfs: the disks use O_DIRECT).
    #[arg(long, default_value = "tern-bench-work")]
    dir: PathBuf,
    /// The `tern` binary; by default the one next to this binary, else `tern` on PATH.
    #[arg(long)]
    tern: Option<PathBuf>,
    /// Where to write the raw runs and the summary as JSON.
    #[arg(long, default_value = "live-results.json")]
    out: PathBuf,
}

/// One case of the scenario.
#[derive(Clone, Copy, Debug, Serialize)]
struct Case {
    name: &'static str,
    queue_depth: u32,
    unpaced: bool,
    mode: &'static str,
}

const CASES: [Case; 3] = [
    Case {
        name: "paced writer, QD1, auto",
        queue_depth: 1,
        unpaced: false,
        mode: "auto",
    },
    Case {
        name: "unpaced writer, QD8, auto",
        queue_depth: 8,
        unpaced: true,
        mode: "auto",
    },
    Case {
        name: "paced writer, QD1, active",
        queue_depth: 1,
        unpaced: false,
        mode: "active",
    },
];

#[derive(Debug, Serialize)]
struct CaseResult {
    case: Case,
    runs: Vec<serde_json::Value>,
    downtime_ms: Option<Summary>,
    total_s: Option<Summary>,
    guest_mib_s: Option<Summary>,
    resent_mib: Option<Summary>,
    latency_p50_us: Option<Summary>,
    latency_p99_us: Option<Summary>,
}

/// Runs every case `runs` times, interleaved, and prints a Markdown report.
pub(crate) fn run(args: &LiveArgs) -> anyhow::Result<()> {
    let tern = args.tern.clone().unwrap_or_else(crate::copy::default_tern);
    std::fs::create_dir_all(&args.dir)?;
    let mut results: Vec<CaseResult> = CASES
        .iter()
        .map(|case| CaseResult {
            case: *case,
            runs: Vec::new(),
            downtime_ms: None,
            total_s: None,
            guest_mib_s: None,
            resent_mib: None,
            latency_p50_us: None,
            latency_p99_us: None,
        })
        .collect();
    let mut dropped = true;
    for round in 0..args.runs {
        for result in &mut results {
            let case = result.case;
            dropped &= crate::process::drop_caches();
            let mut command = Command::new(&tern);
            command
                .args(["demo", "--json", "--size", &args.size])
                .args(["--rate", &args.rate.to_string()])
                .args(["--queue-depth", &case.queue_depth.to_string()])
                .args(["--mode", case.mode])
                .args(["--max-downtime-ms", &args.max_downtime_ms.to_string()])
                .args(["--memory-precopy-ms", &args.memory_precopy_ms.to_string()])
                .arg("--dir")
                .arg(&args.dir);
            if case.unpaced {
                command.arg("--unpaced");
            }
            let output = command.output().context("run tern demo")?;
            if !output.status.success() {
                bail!(
                    "tern demo failed in {}: {}",
                    case.name,
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            let summary: serde_json::Value =
                serde_json::from_slice(&output.stdout).context("tern demo --json output")?;
            if summary["target_matches_source"] != true {
                bail!("{}: target differs from source: {summary}", case.name);
            }
            eprintln!(
                "tern-bench: round {}/{}: {}: downtime {:.1} ms, total {:.2} s, guest {:.1} MiB/s",
                round + 1,
                args.runs,
                case.name,
                summary["storage_downtime_ms"].as_f64().unwrap_or(f64::NAN),
                summary["total_s"].as_f64().unwrap_or(f64::NAN),
                summary["guest_write_mib_s"].as_f64().unwrap_or(f64::NAN),
            );
            result.runs.push(summary);
        }
    }
    let field = |runs: &[serde_json::Value], key: &str, scale: f64| {
        let values: Vec<f64> = runs
            .iter()
            .filter_map(|r| r[key].as_f64())
            .map(|v| v * scale)
            .collect();
        summarize(&values)
    };
    for result in &mut results {
        result.downtime_ms = field(&result.runs, "storage_downtime_ms", 1.0);
        result.total_s = field(&result.runs, "total_s", 1.0);
        result.guest_mib_s = field(&result.runs, "guest_write_mib_s", 1.0);
        result.resent_mib = field(&result.runs, "bytes_resent", 1.0 / (1 << 20) as f64);
        result.latency_p50_us = field(&result.runs, "guest_write_latency_p50_us", 1.0);
        result.latency_p99_us = field(&result.runs, "guest_write_latency_p99_us", 1.0);
    }
    let mut report = format!(
        "# tern-bench live: {} image, {} runs per case, downtime budget {} ms, memory pre-copy {} ms, page cache {}\n\n",
        args.size,
        args.runs,
        args.max_downtime_ms,
        args.memory_precopy_ms,
        if dropped {
            "dropped before every run"
        } else {
            "NOT dropped (no permission)"
        }
    );
    report.push_str("| case | downtime ms (median, min–max) | total s | guest MiB/s achieved | re-sent MiB | write latency p50 µs | p99 µs |\n|---|---:|---:|---:|---:|---:|---:|\n");
    let cell = |s: &Option<Summary>| match s {
        Some(s) => format!("{:.1} ({:.1}–{:.1})", s.median, s.min, s.max),
        None => "–".into(),
    };
    for result in &results {
        report.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            result.case.name,
            cell(&result.downtime_ms),
            cell(&result.total_s),
            cell(&result.guest_mib_s),
            cell(&result.resent_mib),
            cell(&result.latency_p50_us),
            cell(&result.latency_p99_us)
        ));
    }
    let paced = &results[0];
    let downtime_ok = paced.downtime_ms.is_some_and(|s| s.median <= 20.0);
    let guest_ok = paced
        .guest_mib_s
        .is_some_and(|s| s.median >= 0.9 * args.rate);
    report.push_str(&format!(
        "\n| goal | measured | result |\n|---|---:|---|\n| storage downtime ≤ 20 ms (paced QD1) | {} | {} |\n| guest ≥ 90 % of {} MiB/s while migrating (paced QD1, auto) | {} | {} |\n| unpaced QD8: auto converges, target = source | {} runs | PASS |\n",
        cell(&paced.downtime_ms),
        if downtime_ok { "PASS" } else { "FAIL" },
        args.rate,
        cell(&paced.guest_mib_s),
        if guest_ok { "PASS" } else { "FAIL" },
        results[1].runs.len(),
    ));
    report.push_str("\nDowntime is `tern demo`'s storage downtime: from the switchover command (guest paused) to the verified handoff. The guest keeps writing during the stand-in memory pre-copy after convergence, then pauses. The guest rate and the write latencies (submission to completion; in active mode a write completes once it is on the target) are measured from the guest's start to its pause.\n");
    std::fs::write(
        &args.out,
        serde_json::to_string_pretty(&serde_json::json!({"scenario": "live", "cases": results}))?
            + "\n",
    )?;
    print!("{report}");
    Ok(())
}
