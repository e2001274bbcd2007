//! The report of one live case: every run, the medians (min–max) of every system side by
//! side, the ratios of Tern's medians to each peer's, and three charts (remaining bytes and
//! throughput over time, the guest's write-latency distribution).

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::case::{System, Writer};
use crate::nbd::{AFTER_CONVERGED, BASELINE, CaseResults, Run, mib};
use crate::plot::{self, Series, XScale};
use crate::report::opt;
use crate::stats::{Summary, summarize};

/// A quantity of the comparison: its name (with unit), decimals, and how to read it from a
/// run (`None`: the run has no such value).
pub(crate) struct Quantity {
    /// Name and unit, as in the report.
    pub(crate) name: &'static str,
    /// Decimals shown.
    digits: usize,
    /// The value of one run of a case of `size_bytes`.
    value: fn(&Run, u64) -> Option<f64>,
}

/// GiB in bytes.
const GIB: f64 = (1u64 << 30) as f64;

/// The quantities compared, in report order.
pub(crate) const QUANTITIES: &[Quantity] = &[
    Quantity {
        name: "total time (s)",
        digits: 2,
        value: |r, _| Some(r.total_s),
    },
    Quantity {
        name: "time to converge / READY (s)",
        digits: 2,
        value: |r, _| Some(r.converge_s),
    },
    Quantity {
        name: "storage downtime (ms)",
        digits: 1,
        value: |r, _| Some(r.downtime_ms),
    },
    Quantity {
        name: "guest MiB/s before",
        digits: 1,
        value: |r, _| r.before.as_ref().map(|w| w.mib_s),
    },
    Quantity {
        name: "guest MiB/s during",
        digits: 1,
        value: |r, _| r.during.as_ref().map(|w| w.mib_s),
    },
    Quantity {
        name: "during / intended rate",
        digits: 2,
        value: |r, _| r.during_vs_intended,
    },
    Quantity {
        name: "write p50 before (µs)",
        digits: 0,
        value: |r, _| r.before.as_ref().and_then(|w| w.p50_us),
    },
    Quantity {
        name: "write p50 during (µs)",
        digits: 0,
        value: |r, _| r.during.as_ref().and_then(|w| w.p50_us),
    },
    Quantity {
        name: "write p99 before (µs)",
        digits: 0,
        value: |r, _| r.before.as_ref().and_then(|w| w.p99_us),
    },
    Quantity {
        name: "write p99 during (µs)",
        digits: 0,
        value: |r, _| r.during.as_ref().and_then(|w| w.p99_us),
    },
    Quantity {
        name: "on the link, both ways (MiB)",
        digits: 0,
        value: |r, _| Some(mib(r.link_bytes)),
    },
    Quantity {
        name: "processed again (MiB)",
        digits: 0,
        value: |r, _| Some(mib(r.bytes_again)),
    },
    Quantity {
        name: "CPU, source (s)",
        digits: 2,
        value: |r, _| Some(r.source.cpu_s),
    },
    Quantity {
        name: "CPU, target (s)",
        digits: 2,
        value: |r, _| Some(r.target.cpu_s),
    },
    Quantity {
        name: "CPU both ends per GiB of disk (s)",
        digits: 2,
        value: |r, size| {
            (size > 0).then(|| (r.source.cpu_s + r.target.cpu_s) / (size as f64 / GIB))
        },
    },
    Quantity {
        name: "peak RSS, source (MiB)",
        digits: 0,
        value: |r, _| Some(mib(r.source.peak_rss_bytes)),
    },
    Quantity {
        name: "peak RSS, target (MiB)",
        digits: 0,
        value: |r, _| Some(mib(r.target.peak_rss_bytes)),
    },
    Quantity {
        name: "Tern: sent over QUIC, payload (MiB)",
        digits: 0,
        value: |r, _| r.tern.as_ref().map(|t| mib(t.bytes_wire)),
    },
    Quantity {
        name: "Tern: passes",
        digits: 0,
        value: |r, _| r.tern.as_ref().map(|t| t.passes as f64),
    },
    Quantity {
        name: "Tern: auto-mode changes",
        digits: 0,
        value: |r, _| r.tern.as_ref().map(|t| t.mode_changes.len() as f64),
    },
    Quantity {
        name: "Tern: NBD hold at switchover (ms)",
        digits: 2,
        value: |r, _| r.tern.as_ref().and_then(|t| t.quiesce_ms),
    },
];

/// The quantities whose ratio Tern / peer is reported.
const RATIOS: &[&str] = &[
    "total time (s)",
    "time to converge / READY (s)",
    "storage downtime (ms)",
    "guest MiB/s during",
    "write p99 during (µs)",
    "on the link, both ways (MiB)",
    "CPU both ends per GiB of disk (s)",
];

/// One system's runs of a case, summarised.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct SystemSummary {
    /// Which system.
    pub(crate) system: System,
    /// Runs.
    pub(crate) runs: usize,
    /// Every run's target equal to its source (Tern: and verified).
    pub(crate) all_equal: bool,
    /// Per quantity, in [`QUANTITIES`] order: its name and summary.
    pub(crate) quantities: Vec<(&'static str, Option<Summary>)>,
}

impl SystemSummary {
    /// The median of the quantity called `name`.
    pub(crate) fn median(&self, name: &str) -> Option<f64> {
        self.quantities
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, s)| s.map(|s| s.median))
    }
}

/// A ratio of two medians.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Ratio {
    /// The quantity.
    pub(crate) quantity: &'static str,
    /// The Tern variant divided.
    pub(crate) tern: System,
    /// The peer Tern is divided by.
    pub(crate) peer: System,
    /// Tern's median / the peer's, if both exist and the peer's is above 0.
    pub(crate) value: Option<f64>,
}

/// A case's summary: per system, and the ratios.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct CaseSummary {
    /// Per system, in the case's order.
    pub(crate) systems: Vec<SystemSummary>,
    /// Tern / each peer.
    pub(crate) ratios: Vec<Ratio>,
    /// The charts written (file names).
    pub(crate) charts: Vec<String>,
}

impl CaseSummary {
    /// The summary of `system`.
    pub(crate) fn system(&self, system: System) -> Option<&SystemSummary> {
        self.systems.iter().find(|s| s.system == system)
    }

    /// The ratio of `quantity` between the Tern variant `tern` and `peer`.
    pub(crate) fn ratio(&self, quantity: &str, tern: System, peer: System) -> Option<f64> {
        self.ratios
            .iter()
            .find(|r| r.quantity == quantity && r.tern == tern && r.peer == peer)
            .and_then(|r| r.value)
    }
}

/// Summarises the runs of a case.
pub(crate) fn summarize_case(results: &CaseResults) -> CaseSummary {
    let systems: Vec<SystemSummary> = results
        .case
        .systems
        .iter()
        .map(|&system| {
            let runs: Vec<&Run> = results.runs.iter().filter(|r| r.system == system).collect();
            SystemSummary {
                system,
                runs: runs.len(),
                all_equal: runs.iter().all(|r| r.equal),
                quantities: QUANTITIES
                    .iter()
                    .map(|q| {
                        let values: Vec<f64> = runs
                            .iter()
                            .filter_map(|r| (q.value)(r, results.size_bytes))
                            .collect();
                        (q.name, summarize(&values))
                    })
                    .collect(),
            }
        })
        .collect();
    let mut ratios = Vec::new();
    for tern in systems.iter().filter(|s| s.system.is_tern()) {
        for peer in systems.iter().filter(|s| !s.system.is_tern()) {
            for &quantity in RATIOS {
                ratios.push(Ratio {
                    quantity,
                    tern: tern.system,
                    peer: peer.system,
                    value: tern
                        .median(quantity)
                        .zip(peer.median(quantity))
                        .filter(|(_, p)| *p > 0.0)
                        .map(|(t, p)| t / p),
                });
            }
        }
    }
    CaseSummary {
        systems,
        ratios,
        charts: Vec::new(),
    }
}

/// The run of `system` whose total time is the median one (the one charted).
fn median_run(results: &CaseResults, system: System) -> Option<&Run> {
    let mut runs: Vec<&Run> = results.runs.iter().filter(|r| r.system == system).collect();
    runs.sort_by(|a, b| a.total_s.total_cmp(&b.total_s));
    runs.get(runs.len() / 2).copied()
}

/// Draws the case's charts into `out` (`CASE-remaining.svg`, `CASE-throughput.svg`, and
/// with a guest `CASE-latency.svg`); returns the file names written.
fn charts(results: &CaseResults, out: &Path) -> anyhow::Result<Vec<String>> {
    let name = &results.case.name;
    let runs: Vec<&Run> = results
        .case
        .systems
        .iter()
        .filter_map(|&s| median_run(results, s))
        .collect();
    let label = |r: &Run| format!("{} (rep {})", r.system, r.rep);
    let mut written = Vec::new();
    let mut chart = |file: String,
                     title: String,
                     x: &str,
                     y: &str,
                     scale: XScale,
                     series: Vec<Series>|
     -> anyhow::Result<()> {
        if plot::line_chart(&out.join(&file), &title, x, y, scale, &series)? {
            written.push(file);
        }
        Ok(())
    };
    chart(
        format!("{name}-remaining.svg"),
        format!("{name}: bytes left to copy (incl. dirtied again)"),
        "seconds since the migration started",
        "MiB",
        XScale::Linear,
        runs.iter()
            .map(|r| Series {
                label: label(r),
                points: r
                    .course
                    .iter()
                    .map(|p| (p.t_s, mib(p.remaining_bytes)))
                    .collect(),
            })
            .collect(),
    )?;
    chart(
        format!("{name}-throughput.svg"),
        format!("{name}: disk bytes processed per second (zeros included)"),
        "seconds since the migration started",
        "MiB/s",
        XScale::Linear,
        runs.iter()
            .map(|r| Series {
                label: label(r),
                points: r
                    .course
                    .windows(2)
                    .filter(|w| w[1].t_s > w[0].t_s)
                    .map(|w| {
                        let bytes = w[1].done_bytes.saturating_sub(w[0].done_bytes);
                        (w[1].t_s, mib(bytes) / (w[1].t_s - w[0].t_s))
                    })
                    .collect(),
            })
            .collect(),
    )?;
    if results.case.writer != Writer::None {
        chart(
            format!("{name}-latency.svg"),
            format!("{name}: guest write latency during the migration (CDF)"),
            "latency, µs (log)",
            "fraction of writes at or below",
            XScale::Log,
            runs.iter()
                .map(|r| {
                    let n = r.during_latency_us.len().saturating_sub(1).max(1) as f64;
                    Series {
                        label: label(r),
                        points: r
                            .during_latency_us
                            .iter()
                            .enumerate()
                            .map(|(i, us)| (*us, i as f64 / n))
                            .collect(),
                    }
                })
                .collect(),
        )?;
    }
    Ok(written)
}

/// Summarises the case, draws its charts and writes `CASE.md` and `CASE.json` into `out`;
/// returns the summary and the Markdown.
pub(crate) fn write(results: &CaseResults, out: &Path) -> anyhow::Result<(CaseSummary, String)> {
    let mut summary = summarize_case(results);
    summary.charts = charts(results, out)?;
    let markdown = render(results, &summary);
    let name = &results.case.name;
    let json_path = out.join(format!("{name}.json"));
    let md_path = out.join(format!("{name}.md"));
    let json = serde_json::json!({ "results": results, "summary": summary });
    fs::write(&json_path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("write {}", json_path.display()))?;
    fs::write(&md_path, &markdown).with_context(|| format!("write {}", md_path.display()))?;
    eprintln!(
        "tern-bench: wrote {} and {}",
        md_path.display(),
        json_path.display()
    );
    Ok((summary, markdown))
}

/// A summary cell: `median (min–max)`.
fn cell(summary: Option<Summary>, digits: usize) -> String {
    match summary {
        Some(v) => format!("{:.d$} ({:.d$}–{:.d$})", v.median, v.min, v.max, d = digits),
        None => "–".to_owned(),
    }
}

/// The median table of a case (used by the suite's report too).
pub(crate) fn median_table(summary: &CaseSummary) -> String {
    let mut out = String::from("| median (min–max) |");
    for s in &summary.systems {
        let _ = write!(out, " {} |", s.system);
    }
    let _ = writeln!(out, "\n|---|{}", "---:|".repeat(summary.systems.len()));
    for (q, quantity) in QUANTITIES.iter().enumerate() {
        if summary.systems.iter().all(|s| s.quantities[q].1.is_none()) {
            continue;
        }
        let _ = write!(out, "| {} |", quantity.name);
        for s in &summary.systems {
            let _ = write!(out, " {} |", cell(s.quantities[q].1, quantity.digits));
        }
        let _ = writeln!(out);
    }
    let _ = write!(out, "| target = source, every run |");
    for s in &summary.systems {
        let _ = write!(out, " {} |", if s.all_equal { "yes" } else { "**NO**" });
    }
    let _ = writeln!(out);
    out
}

/// The Markdown report of a case.
fn render(results: &CaseResults, summary: &CaseSummary) -> String {
    let case = &results.case;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# {}: {}, {}\n",
        case.name,
        case.writer.describe(),
        case.link.describe()
    );
    let dropped = results.runs.iter().filter(|r| r.caches_dropped).count();
    let _ = writeln!(
        out,
        "Image: {:.0} MiB, mix `{}`, seed = repetition; {} repetition(s), each running {} in \
         turn on a fresh image of the same seed. Tern: mode `{}`, downtime budget {} ms. Page \
         cache of the sources: {} (`tern export --cache`, QEMU cache.direct); targets: `tern \
         serve` O_DIRECT, QEMU cache.direct={}. Page cache dropped before {dropped}/{} runs.  ",
        mib(results.size_bytes),
        case.mix,
        case.reps,
        case.systems
            .iter()
            .map(System::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        case.mode,
        case.max_downtime_ms,
        case.cache,
        if case.qemu_target_cache == "none" {
            "on"
        } else {
            "off"
        },
        results.runs.len(),
    );
    if let Some(fio) = &results.fio_cmd {
        let _ = writeln!(out, "Guest ({}): `{fio}`.  ", results.fio_version);
    }
    if let Some(qemu) = &results.qemu_version {
        let _ = writeln!(out, "QEMU: {qemu}.  ");
    }
    let _ = writeln!(out, "tern: `{}`.\n", results.tern);

    let _ = writeln!(out, "{}", median_table(summary));
    if !summary.ratios.is_empty() {
        let _ = writeln!(
            out,
            "| ratio of medians, Tern / peer | peer | value |\n|---|---|---:|"
        );
        for r in &summary.ratios {
            let _ = writeln!(out, "| {} | {} | {} |", r.quantity, r.peer, opt(r.value, 2));
        }
        let _ = writeln!(out);
    }
    for chart in &summary.charts {
        let _ = writeln!(out, "![{chart}]({chart})");
    }
    let _ = writeln!(
        out,
        "\n| rep | system | total s | converge s | downtime ms | MiB/s before → during | p99 µs before → during | link MiB | again MiB | CPU s src + dst | RSS MiB src / dst | target = source |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for r in &results.runs {
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} | {:.2} | {:.1} | {} → {} | {} → {} | {:.0} | {:.0} | {:.2} + {:.2} | {:.0} / {:.0} | {} |",
            r.rep,
            r.system,
            r.total_s,
            r.converge_s,
            r.downtime_ms,
            opt(r.before.as_ref().map(|w| w.mib_s), 1),
            opt(r.during.as_ref().map(|w| w.mib_s), 1),
            opt(r.before.as_ref().and_then(|w| w.p99_us), 0),
            opt(r.during.as_ref().and_then(|w| w.p99_us), 0),
            mib(r.link_bytes),
            mib(r.bytes_again),
            r.source.cpu_s,
            r.target.cpu_s,
            mib(r.source.peak_rss_bytes),
            mib(r.target.peak_rss_bytes),
            if r.equal { "yes" } else { "**NO**" },
        );
    }
    let _ = writeln!(
        out,
        "\nMethod. Tern: `tern serve --export-nbd` (target) and `tern export` (source), `tern \
         ctl migrate` (t0), `tern ctl wait converged` (t1), then `switchover commit=true`; total \
         time is the daemon's `total-time-s` (migrate → commit), downtime the switchover's \
         `downtime-ms` (hold of the NBD clients → verified handoff). QEMU: `blockdev-add` of an \
         NBD client node for the target, `blockdev-mirror` sync=full (t0), `BLOCK_JOB_READY` \
         (t1), `block-job-complete`; downtime is from that command to `BLOCK_JOB_COMPLETED`, \
         total time from `blockdev-mirror` to it. With a guest: fio writes {} s before t0 \
         (\"before\"), \"during\" is t0 → t1, and it writes {} s after t1 before it is stopped \
         (a VMM pausing the VM), which the total includes. Latencies are fio's total latency \
         per write (submission to completion). CPU and peak RSS (VmHWM) of both daemons come \
         from /proc just before they stop; link bytes from the kernel's interface counters \
         (both directions, headers included). \"Processed again\": Tern's re-sent bytes; \
         QEMU's final job offset beyond the disk size. Charts show each system's run with the \
         median total time.",
        BASELINE.as_secs(),
        AFTER_CONVERGED.as_secs()
    );
    out
}
