//! The benchmark harness end to end, small: `tern-bench suite` with a suite file of three tiny
//! cases — Tern against QEMU's mirror with NBD over TLS and a paced fio guest on loopback, an
//! idle guest over a `tbf`-shaped veth link into a network namespace, and Tern with BBR over
//! the WAN emulator — then the report, the per-case reports and the charts it wrote.
//!
//! Needs root (network namespaces, `tbf`, dropping caches), `qemu-storage-daemon`,
//! `qemu-img`, `fio` and `openssl`; `scripts/test` installs them.

use std::fs;
use std::process::Command;

use tern_tests::tern_bench_bin;

const SUITE: &str = r#"
[[case]]
name = "tiny-tls"
size = "64M"
reps = 1
writer = { kind = "paced", rate-mib-s = 8, queue-depth = 1 }
systems = ["tern", "qemu-background-tls"]

[[case]]
name = "tiny-tbf"
size = "8M"
reps = 1
link = "tbf:200"
systems = ["tern", "qemu-background"]

[[case]]
name = "tiny-wan"
size = "4M"
reps = 1
link = "wan:100:10:0.001"
systems = ["tern-bbr"]
"#;

#[test]
fn a_tiny_suite_runs_every_system_and_link_and_writes_reports_and_charts() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch dir");
    let config = dir.path().join("suite.toml");
    fs::write(&config, SUITE).unwrap();
    let out = dir.path().join("out");
    let output = Command::new(tern_bench_bin())
        .arg("suite")
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(&out)
        .arg("--dir")
        .arg(dir.path().join("work"))
        .args(["--hardware-rounds", "1"])
        .output()
        .expect("run tern-bench suite");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "tern-bench suite failed:\n{stderr}"
    );

    let report = fs::read_to_string(out.join("report.md")).expect("report.md");
    for needle in [
        "## Targets",
        "## Hardware limits",
        "## tiny-tls",
        "## tiny-tbf",
        "## tiny-wan",
        // The standard suite's cases are not in this file: their targets are not measured.
        "not measured",
    ] {
        assert!(
            report.contains(needle),
            "report.md lacks {needle:?}:\n{report}"
        );
    }
    assert!(!report.contains("**Failed**"), "{report}");

    let tls = fs::read_to_string(out.join("tiny-tls.md")).expect("tiny-tls.md");
    assert!(tls.contains("| tern | qemu-background-tls |"), "{tls}");
    assert!(tls.contains("| guest MiB/s during |"), "{tls}");
    assert!(
        !tls.contains("**NO**"),
        "a target differed from its source:\n{tls}"
    );
    let tbf = fs::read_to_string(out.join("tiny-tbf.md")).expect("tiny-tbf.md");
    assert!(tbf.contains("tbf on a veth pair"), "{tbf}");
    assert!(!tbf.contains("**NO**"), "{tbf}");
    let wan = fs::read_to_string(out.join("tiny-wan.md")).expect("tiny-wan.md");
    assert!(wan.contains("| tern-bbr |"), "{wan}");

    // Runs carry what the report is built from: CPU, memory, the link's bytes, the course.
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("tiny-tls.json")).unwrap()).unwrap();
    let runs = json["results"]["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2);
    for run in runs {
        assert_eq!(run["equal"], true, "{run}");
        assert!(run["source"]["cpu_s"].as_f64().unwrap() > 0.0, "{run}");
        assert!(
            run["target"]["peak_rss_bytes"].as_u64().unwrap() > 0,
            "{run}"
        );
        assert!(run["link_bytes"].as_u64().unwrap() >= 32 << 20, "{run}");
        assert!(
            !run["during_latency_us"].as_array().unwrap().is_empty(),
            "{run}"
        );
    }
    for chart in [
        "tiny-tls-latency.svg",
        "tiny-tls-remaining.svg",
        "tiny-tbf-remaining.svg",
    ] {
        let svg = fs::read_to_string(out.join(chart)).unwrap_or_default();
        assert!(svg.starts_with("<svg"), "{chart} missing");
    }
    // The namespace of the shaped link is gone.
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&namespaces.stdout).contains("tern-bench-target"),
        "the shaped link's namespace was left behind"
    );
}
