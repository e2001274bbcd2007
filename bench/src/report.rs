//! Summaries of the raw runs and the Markdown report.

use std::fmt::Write as _;

use serde::Serialize;

use crate::copy::{CopyResults, RunRecord, System};
use crate::stats::{Summary, summarize};

/// Goal: Tern (auto) takes at most this multiple of qemu-img convert's time.
pub(crate) const TIME_RATIO_GOAL: f64 = 1.0;
/// Goal: Tern (zstd) sends at most this fraction of the virtual size.
pub(crate) const WIRE_RATIO_GOAL: f64 = 0.65;

/// The runs of one system, summarised.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct SystemStats {
    /// Which system.
    pub(crate) system: System,
    /// Number of runs.
    pub(crate) runs: usize,
    /// Wall-clock seconds.
    pub(crate) seconds: Summary,
    /// Virtual MiB per wall-clock second.
    pub(crate) mib_s: Summary,
    /// bytes_wire / bytes_total (Tern only).
    pub(crate) wire_ratio: Option<Summary>,
    /// Whether every run left a target equal to the source.
    pub(crate) all_equal: bool,
}

/// A goal and whether the medians meet it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Target {
    /// What is asked.
    pub(crate) name: String,
    /// The measured value (a ratio), if it could be measured.
    pub(crate) measured: Option<f64>,
    /// The bound it must not exceed.
    pub(crate) goal: f64,
    /// `measured <= goal`.
    pub(crate) pass: bool,
}

/// Everything the report shows, derived from the raw runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Analysis {
    /// Per system, in run order.
    pub(crate) systems: Vec<SystemStats>,
    /// Median time of tern (auto) / median time of qemu-img.
    pub(crate) auto_time_ratio: Option<f64>,
    /// Median time of tern (zstd) / median time of qemu-img.
    pub(crate) zstd_time_ratio: Option<f64>,
    /// Median bytes_wire / bytes_total of tern (zstd).
    pub(crate) zstd_wire_ratio: Option<f64>,
    /// The goals.
    pub(crate) targets: Vec<Target>,
    /// Runs before which the page cache was dropped, of all runs.
    pub(crate) caches_dropped: (usize, usize),
    /// Whether every copy equalled the source.
    pub(crate) all_equal: bool,
}

fn system_stats(system: System, runs: &[&RunRecord]) -> Option<SystemStats> {
    let seconds: Vec<f64> = runs.iter().map(|r| r.seconds).collect();
    let mib_s: Vec<f64> = runs.iter().map(|r| r.mib_s).collect();
    let wire: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.tern.as_ref())
        .filter(|t| t.bytes_total > 0)
        .map(|t| t.bytes_wire as f64 / t.bytes_total as f64)
        .collect();
    Some(SystemStats {
        system,
        runs: runs.len(),
        seconds: summarize(&seconds)?,
        mib_s: summarize(&mib_s)?,
        wire_ratio: summarize(&wire),
        all_equal: runs.iter().all(|r| r.target_equal),
    })
}

/// Summarises the runs and checks the goals.
pub(crate) fn analyze(results: &CopyResults) -> Analysis {
    let systems: Vec<SystemStats> = System::ALL
        .iter()
        .filter_map(|&system| {
            let runs: Vec<&RunRecord> =
                results.runs.iter().filter(|r| r.system == system).collect();
            system_stats(system, &runs)
        })
        .collect();
    let find = |s: System| systems.iter().find(|x| x.system == s);
    let time_ratio = |s: System| {
        let qemu = find(System::QemuImg)?.seconds.median;
        Some(find(s)?.seconds.median / qemu)
    };
    let auto_time_ratio = time_ratio(System::TernAuto);
    let zstd_time_ratio = time_ratio(System::TernZstd);
    let zstd_wire_ratio = find(System::TernZstd)
        .and_then(|s| s.wire_ratio)
        .map(|w| w.median);
    let target = |name: &str, measured: Option<f64>, goal: f64| Target {
        name: name.to_owned(),
        measured,
        goal,
        pass: measured.is_some_and(|m| m <= goal),
    };
    let targets = vec![
        target(
            "tern auto total time ≤ 1.0 × qemu-img convert",
            auto_time_ratio,
            TIME_RATIO_GOAL,
        ),
        target("zstd wire ≤ 65 %", zstd_wire_ratio, WIRE_RATIO_GOAL),
    ];
    let dropped = results.runs.iter().filter(|r| r.caches_dropped).count();
    Analysis {
        all_equal: results.runs.iter().all(|r| r.target_equal),
        systems,
        auto_time_ratio,
        zstd_time_ratio,
        zstd_wire_ratio,
        targets,
        caches_dropped: (dropped, results.runs.len()),
    }
}

/// `value` with `digits` decimals, or a dash when there is none.
pub(crate) fn opt(value: Option<f64>, digits: usize) -> String {
    match value {
        Some(v) => format!("{v:.digits$}"),
        None => "–".to_owned(),
    }
}

/// The Markdown report.
pub(crate) fn render(results: &CopyResults, analysis: &Analysis) -> String {
    let c = &results.config;
    let mut out = String::new();
    let mib = c.size_bytes as f64 / (1u64 << 20) as f64;
    let _ = writeln!(out, "# Tern copy benchmark\n");
    let _ = writeln!(
        out,
        "Image: {mib:.0} MiB ({} bytes), mix `{}`, seed {}; {} round(s), systems interleaved \
         within each round, their order rotating from round to round.  ",
        c.size_bytes, c.mix, c.seed, c.rounds
    );
    let (dropped, total) = analysis.caches_dropped;
    let cache_note = if dropped == total {
        "yes, before every run"
    } else if dropped == 0 {
        "no (not permitted)"
    } else {
        "only before some runs"
    };
    let _ = writeln!(
        out,
        "Page cache dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`): {cache_note} \
         ({dropped}/{total}).  "
    );
    let _ = writeln!(
        out,
        "qemu: {}; `{}`; `{}`.  ",
        c.qemu_version, c.qemu_nbd_cmd, c.qemu_img_cmd
    );
    let _ = writeln!(out, "tern: `{}`.\n", c.tern);

    let _ = writeln!(
        out,
        "| System | Runs | Time median (s) | Time min (s) | Time max (s) | MiB/s median | MiB/s min | MiB/s max | Wire / total | Target = source |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for s in &analysis.systems {
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {} | {} |",
            s.system.label(),
            s.runs,
            s.seconds.median,
            s.seconds.min,
            s.seconds.max,
            s.mib_s.median,
            s.mib_s.min,
            s.mib_s.max,
            opt(s.wire_ratio.map(|w| w.median), 3),
            if s.all_equal { "yes" } else { "**NO**" },
        );
    }

    let _ = writeln!(out, "\n| Ratio (medians) | Value |\n|---|---:|");
    let _ = writeln!(
        out,
        "| tern auto time / qemu-img time | {} |",
        opt(analysis.auto_time_ratio, 3)
    );
    let _ = writeln!(
        out,
        "| tern zstd time / qemu-img time | {} |",
        opt(analysis.zstd_time_ratio, 3)
    );
    let _ = writeln!(
        out,
        "| tern zstd bytes_wire / bytes_total | {} |",
        opt(analysis.zstd_wire_ratio, 3)
    );

    let _ = writeln!(
        out,
        "\n| Target | Goal | Measured | Result |\n|---|---:|---:|---|"
    );
    for t in &analysis.targets {
        let _ = writeln!(
            out,
            "| {} | ≤ {:.2} | {} | {} |",
            t.name,
            t.goal,
            opt(t.measured, 3),
            if t.pass { "PASS" } else { "FAIL" }
        );
    }
    let _ = writeln!(
        out,
        "| every copy equals the source | – | {} | {} |",
        if analysis.all_equal { "yes" } else { "no" },
        if analysis.all_equal { "PASS" } else { "FAIL" }
    );
    let _ = writeln!(
        out,
        "\nTimes are wall-clock seconds of the copying command (`qemu-img convert`, \
         `tern migrate`), servers already listening; MiB/s is virtual size / time. \
         Tern's time includes its own end-to-end digest verification; the equality check \
         (`qemu-img compare`) runs outside every timing."
    );
    out
}

#[cfg(test)]
mod tests {
    use super::{analyze, opt, render};
    use crate::copy::{CopyConfig, CopyResults, RunRecord, System, TernSummary};

    fn run(system: System, round: u32, seconds: f64, wire: u64) -> RunRecord {
        let total = 1u64 << 30;
        RunRecord {
            system,
            round,
            seconds,
            mib_s: 1024.0 / seconds,
            caches_dropped: true,
            target_equal: true,
            tern: (system != System::QemuImg).then(|| TernSummary {
                bytes_total: total,
                bytes_data: total / 4 * 3,
                bytes_wire: wire,
                duration_s: seconds - 0.1,
                throughput_mib_s: 1024.0 / seconds,
                verified: true,
            }),
        }
    }

    fn results() -> CopyResults {
        let gib = 1u64 << 30;
        CopyResults {
            config: CopyConfig {
                size_bytes: gib,
                rounds: 2,
                mix: "random=50,hole=25,text=25".into(),
                seed: 1,
                qemu_nbd_aio: "io_uring".into(),
                qemu_nbd_cmd: "qemu-nbd …".into(),
                qemu_img_cmd: "qemu-img convert …".into(),
                qemu_version: "qemu-img version 10.0.2".into(),
                tern: "target/release/tern".into(),
            },
            runs: vec![
                run(System::QemuImg, 1, 4.0, 0),
                run(System::TernAuto, 1, 3.0, gib / 2),
                run(System::TernZstd, 1, 5.0, gib / 2),
                run(System::QemuImg, 2, 2.0, 0),
                run(System::TernAuto, 2, 4.0, gib / 2),
                run(System::TernZstd, 2, 7.0, gib / 10 * 7),
            ],
        }
    }

    #[test]
    fn analysis_takes_medians_and_checks_goals() {
        let a = analyze(&results());
        assert_eq!(a.systems.len(), 3);
        assert_eq!(a.systems[0].seconds.median, 3.0);
        assert_eq!(a.systems[1].seconds.median, 3.5);
        assert_eq!(a.auto_time_ratio, Some(3.5 / 3.0));
        assert_eq!(a.zstd_time_ratio, Some(2.0));
        let wire = a.zstd_wire_ratio.unwrap();
        assert!((wire - 0.6).abs() < 1e-3, "{wire}");
        assert!(!a.targets[0].pass);
        assert!(a.targets[1].pass);
        assert_eq!(a.caches_dropped, (6, 6));
        assert!(a.all_equal);
    }

    #[test]
    fn report_has_the_table_rows_and_verdicts() {
        let r = results();
        let text = render(&r, &analyze(&r));
        assert!(
            text.contains(
                "| qemu-img convert → qemu-nbd | 2 | 3.00 | 2.00 | 4.00 | 384.0 | 256.0 | 512.0 | – | yes |"
            ),
            "{text}"
        );
        assert!(
            text.contains("| tern (compress auto) | 2 | 3.50 | 3.00 | 4.00 |"),
            "{text}"
        );
        assert!(
            text.contains("| tern auto time / qemu-img time | 1.167 |"),
            "{text}"
        );
        assert!(
            text.contains("| tern zstd bytes_wire / bytes_total | 0.600 |"),
            "{text}"
        );
        assert!(
            text.contains(
                "| tern auto total time ≤ 1.0 × qemu-img convert | ≤ 1.00 | 1.167 | FAIL |"
            ),
            "{text}"
        );
        assert!(
            text.contains("| zstd wire ≤ 65 % | ≤ 0.65 | 0.600 | PASS |"),
            "{text}"
        );
        assert!(text.contains("yes, before every run (6/6)"), "{text}");
    }

    #[test]
    fn missing_values_show_a_dash() {
        assert_eq!(opt(None, 2), "–");
        assert_eq!(opt(Some(0.12345), 2), "0.12");
    }
}
