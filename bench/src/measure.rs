//! What every live run measures the same way for every system: the CPU time and peak memory
//! of the daemons at both ends, the migration's course over time, and the guest's latency
//! distribution.

use std::fs;

use anyhow::{Context, bail};
use serde::Serialize;

/// CPU time and peak memory of one process so far, from `/proc`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub(crate) struct Usage {
    /// User + system CPU seconds.
    pub(crate) cpu_s: f64,
    /// Peak resident set (`VmHWM`), bytes.
    pub(crate) peak_rss_bytes: u64,
}

/// The usage of process `pid` (read it before stopping the process: `/proc` forgets it).
pub(crate) fn usage(pid: u32) -> anyhow::Result<Usage> {
    let stat_path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&stat_path).with_context(|| format!("read {stat_path}"))?;
    let status_path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&status_path).with_context(|| format!("read {status_path}"))?;
    parse_usage(&stat, &status, clock_ticks())
        .with_context(|| format!("parse {stat_path} and {status_path}"))
}

/// Clock ticks per second of `/proc/PID/stat`'s times.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Parses `utime` and `stime` (fields 14 and 15 of `stat`, counted after the parenthesised
/// command name, which may hold spaces) and `VmHWM` of `status`.
fn parse_usage(stat: &str, status: &str, ticks: f64) -> anyhow::Result<Usage> {
    let after_name = stat
        .rfind(')')
        .map(|at| &stat[at + 1..])
        .context("no command name in stat")?;
    // Field 3 (state) is the first after the name.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<f64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse::<f64>().ok())
            .with_context(|| format!("stat field {n}"))
    };
    let cpu_s = (field(14)? + field(15)?) / ticks;
    let Some(hwm) = status.lines().find_map(|l| l.strip_prefix("VmHWM:")) else {
        bail!("no VmHWM in status");
    };
    let kib: u64 = hwm
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .context("VmHWM")?;
    Ok(Usage {
        cpu_s,
        peak_rss_bytes: kib * 1024,
    })
}

/// One sample of a migration's course.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub(crate) struct CoursePoint {
    /// Seconds since the migration started.
    pub(crate) t_s: f64,
    /// Bytes still to copy: not yet copied plus dirtied again (Tern: bytes total − done +
    /// dirty; QEMU: the job's `len − offset`).
    pub(crate) remaining_bytes: u64,
    /// Bytes of the disk processed so far, zeros included (Tern: `bytes-done`; QEMU: the
    /// job's `offset`).
    pub(crate) done_bytes: u64,
}

/// The `q`-quantiles of `sorted` for q = 0, 1/n, …, 1 (n + 1 values; empty if `sorted` is).
pub(crate) fn quantiles(sorted: &[f64], n: usize) -> Vec<f64> {
    if sorted.is_empty() || n == 0 {
        return Vec::new();
    }
    (0..=n)
        .map(|i| {
            let rank = (i as f64 / n as f64 * (sorted.len() - 1) as f64).round() as usize;
            sorted[rank]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{Usage, parse_usage, quantiles};

    #[test]
    fn usage_reads_cpu_ticks_after_a_name_with_spaces_and_the_peak_rss() {
        let stat = "4242 (tern (a b)) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 50 0 0 20 0 9 0";
        let status = "Name:\ttern\nVmPeak:\t  999 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1024 kB\n";
        assert_eq!(
            parse_usage(stat, status, 100.0).unwrap(),
            Usage {
                cpu_s: 3.0,
                peak_rss_bytes: 2 << 20
            }
        );
        assert!(parse_usage("4242 (x) S 1", status, 100.0).is_err());
        assert!(parse_usage(stat, "Name: x\n", 100.0).is_err());
    }

    #[test]
    fn quantiles_span_min_to_max() {
        let sorted: Vec<f64> = (1..=101).map(f64::from).collect();
        let q = quantiles(&sorted, 4);
        assert_eq!(q, vec![1.0, 26.0, 51.0, 76.0, 101.0]);
        assert!(quantiles(&[], 4).is_empty());
        assert_eq!(quantiles(&[7.0], 2), vec![7.0, 7.0, 7.0]);
    }
}
