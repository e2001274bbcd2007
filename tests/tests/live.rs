//! `tern demo`: a live migration with a guest writing through a `TrackedDisk`, over real
//! QUIC on loopback with real files, ends with target == source byte for byte.

use tern_tests::tern;

fn demo(args: &[&str]) -> serde_json::Value {
    let output = tern()
        .args(["demo", "--json"])
        .args(args)
        .output()
        .expect("spawn tern demo");
    assert!(
        output.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON line")
}

#[test]
fn a_live_migration_with_a_writing_guest_ends_byte_for_byte_equal() {
    let summary = demo(&["--size", "96M", "--rate", "32"]);
    assert_eq!(summary["verified"], true, "{summary}");
    assert_eq!(summary["target_matches_source"], true, "{summary}");
    assert!(summary["guest_writes"].as_u64().unwrap() > 0, "{summary}");
    assert!(summary["passes"].as_u64().unwrap() >= 1, "{summary}");
    assert!(
        summary["storage_downtime_ms"].as_f64().unwrap() > 0.0,
        "{summary}"
    );
}

#[test]
fn a_live_migration_with_a_fast_guest_and_read_back_verification() {
    let summary = demo(&["--size", "64M", "--rate", "200", "--verify", "read-back"]);
    assert_eq!(summary["verified"], true, "{summary}");
    assert_eq!(summary["target_matches_source"], true, "{summary}");
}

#[test]
fn a_migration_without_a_guest_switches_over_after_the_bulk_pass() {
    let summary = demo(&["--size", "32M", "--rate", "0"]);
    assert_eq!(summary["target_matches_source"], true, "{summary}");
    assert_eq!(summary["guest_writes"], 0, "{summary}");
}

#[test]
fn auto_throttles_a_guest_faster_than_the_link_and_converges() {
    let summary = demo(&[
        "--size",
        "96M",
        "--unpaced",
        "--queue-depth",
        "8",
        "--mode",
        "auto",
    ]);
    assert_eq!(summary["target_matches_source"], true, "{summary}");
    assert!(summary["mode_changes"].as_u64().unwrap() >= 1, "{summary}");
}

#[test]
fn background_reports_that_a_fast_guest_does_not_converge() {
    let output = tern()
        .args([
            "demo",
            "--size",
            "96M",
            "--unpaced",
            "--queue-depth",
            "8",
            "--mode",
            "background",
        ])
        .output()
        .expect("spawn tern demo");
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not converging") && stderr.contains("MiB/s"),
        "no report with numbers: {stderr}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("target equals source"), "{stdout}");
}

#[test]
fn active_mode_mirrors_every_guest_write_and_ends_byte_for_byte_equal() {
    let summary = demo(&["--size", "64M", "--rate", "32", "--mode", "active"]);
    assert_eq!(summary["verified"], true, "{summary}");
    assert_eq!(summary["target_matches_source"], true, "{summary}");
    assert!(summary["guest_writes"].as_u64().unwrap() > 0, "{summary}");
    // Active mode is announced as a mode change, and latencies are reported.
    assert!(summary["mode_changes"].as_u64().unwrap() >= 1, "{summary}");
    let p50 = summary["guest_write_latency_p50_us"].as_u64().unwrap();
    let p99 = summary["guest_write_latency_p99_us"].as_u64().unwrap();
    assert!(p50 > 0 && p99 >= p50, "{summary}");
}
