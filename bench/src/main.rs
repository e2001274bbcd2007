//! `tern-bench`: Tern's benchmark harness. Each scenario runs Tern and its peers in the same
//! invocation, interleaved, and reports medians, ratios and whether the goals are met.

mod case;
mod compare;
mod copy;
mod link;
mod live;
mod measure;
mod nbd;
mod plot;
mod process;
mod proxy;
mod qemu;
mod report;
mod stats;
mod suite;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Benchmarks Tern against its peers on this machine (loopback).
#[derive(Parser, Debug)]
#[command(name = "tern-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The scenarios.
#[derive(Subcommand, Debug)]
enum Command {
    /// Copy one seeded image with `qemu-img convert` → `qemu-nbd` and with `tern migrate`
    /// (compress auto and zstd), interleaved.
    Copy(copy::CopyArgs),
    /// Live migration with a writing guest (`tern demo`), repeated: storage downtime and the
    /// guest's achieved write rate.
    Live(live::LiveArgs),
    /// One live case: a migration through the daemon's NBD export (`tern export` → `tern
    /// serve --export-nbd`) with fio writing over NBD (or an idle guest), driven by `tern
    /// ctl`, on loopback or an emulated link; with `--qemu MODES`, QEMU's mirror on the same
    /// case, interleaved. Report, JSON and charts.
    Nbd(nbd::NbdArgs),
    /// The standard suite (`bench/suite.toml`): the hardware limits and every case, Tern and
    /// its peers interleaved; one Markdown report that checks the performance targets.
    Suite(suite::SuiteArgs),
    /// A link emulator between two processes: delay, jitter, loss, duplication, reordering
    /// and rate for UDP (Tern's QUIC), delay, jitter and rate for TCP (QEMU's NBD).
    Proxy(proxy::ProxyArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Copy(args) => run_copy(&args),
        Command::Live(args) => live::run(&args),
        Command::Nbd(args) => nbd::run(&args),
        Command::Suite(args) => suite::run(&args),
        Command::Proxy(args) => proxy::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the copy scenario, writes the JSON results and the report, prints the report.
fn run_copy(args: &copy::CopyArgs) -> anyhow::Result<()> {
    let results = copy::run(args)?;
    let analysis = report::analyze(&results);
    let json = serde_json::json!({
        "scenario": "copy",
        "config": results.config,
        "runs": results.runs,
        "analysis": analysis,
    });
    std::fs::write(&args.out, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("write {}", args.out.display()))?;
    let text = report::render(&results, &analysis);
    std::fs::write(&args.report, &text)
        .with_context(|| format!("write {}", args.report.display()))?;
    print!("{text}");
    eprintln!(
        "tern-bench: wrote {} and {}",
        args.out.display(),
        args.report.display()
    );
    Ok(())
}
