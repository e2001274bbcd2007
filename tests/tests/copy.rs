//! `tern migrate` against `tern serve`, as two processes on loopback QUIC: images of every
//! shape arrive byte for byte, sparse images stay sparse, and a peer with the wrong
//! certificate is refused before any data flows.

use std::path::Path;

use tern_tests::{allocated_bytes, free_udp_addr, keygen, run, spawn_serve, tern};

struct Keys {
    source: std::path::PathBuf,
    source_fp: String,
    target: std::path::PathBuf,
    target_fp: String,
}

fn keys(dir: &Path) -> Keys {
    let (source, source_fp) = keygen(dir, "source-id");
    let (target, target_fp) = keygen(dir, "target-id");
    Keys {
        source,
        source_fp,
        target,
        target_fp,
    }
}

/// Migrates `source` into a new `target` image and returns the `--json` summary.
fn migrate(keys: &Keys, source: &Path, target: &Path, extra: &[&str]) -> serde_json::Value {
    let addr = free_udp_addr();
    let mut serve = spawn_serve(addr, &[target], &keys.target, &keys.source_fp);
    let output = tern()
        .args(["migrate", "--json", "--to", &addr.to_string(), "--identity"])
        .arg(&keys.source)
        .args(["--peer", &keys.target_fp, "--image"])
        .arg(source)
        .args(extra)
        .output()
        .expect("spawn tern migrate");
    assert!(
        output.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status = serve.0.wait().expect("wait for serve");
    assert!(status.success(), "serve exited with {status}");
    let summary: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON line on stdout");
    let keys_expected = [
        "bytes_total",
        "bytes_data",
        "bytes_wire",
        "duration_s",
        "throughput_mib_s",
        "verified",
    ];
    let object = summary.as_object().expect("a JSON object");
    assert_eq!(object.len(), keys_expected.len(), "{summary}");
    for key in keys_expected {
        assert!(object.contains_key(key), "missing {key} in {summary}");
    }
    summary
}

fn assert_same_file(a: &Path, b: &Path) {
    let status = std::process::Command::new("cmp")
        .arg(a)
        .arg(b)
        .status()
        .expect("run cmp");
    assert!(
        status.success(),
        "cmp {} {} differ",
        a.display(),
        b.display()
    );
}

fn gen_image(path: &Path, size: &str, mix: &str) {
    let output = run(&[
        "gen-image",
        "--out",
        path.to_str().unwrap(),
        "--size",
        size,
        "--mix",
        mix,
        "--seed",
        "3",
    ]);
    assert!(output.status.success(), "gen-image: {output:?}");
}

#[test]
fn images_of_every_shape_arrive_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let keys = keys(dir.path());
    let cases = [
        ("empty", "0", "random=100"),
        ("one-byte", "1", "random=100"),
        ("mib-plus-one", "1048577", "random=50,text=50"),
        ("random", "48M", "random=100"),
        ("zeros", "48M", "zero=100"),
        ("mixed", "96M", "random=50,hole=25,text=25"),
    ];
    for (name, size, mix) in cases {
        let source = dir.path().join(format!("{name}.src"));
        let target = dir.path().join(format!("{name}.dst"));
        gen_image(&source, size, mix);
        let summary = migrate(&keys, &source, &target, &[]);
        assert_eq!(summary["verified"], true, "{name}: {summary}");
        assert_same_file(&source, &target);
        assert!(
            !tern_engine::driver::incomplete_marker(&target).exists(),
            "{name}: target still marked incomplete"
        );
        if name == "zeros" {
            assert_eq!(summary["bytes_data"], 0, "zeros never travel as data");
            assert!(
                allocated_bytes(&target) < 1 << 20,
                "written zeros arrive as holes"
            );
        }
    }
}

#[test]
fn a_sparse_gibibyte_stays_sparse_and_compression_shrinks_text() {
    let dir = tempfile::tempdir().unwrap();
    let keys = keys(dir.path());
    let source = dir.path().join("sparse.src");
    let target = dir.path().join("sparse.dst");
    gen_image(&source, "1G", "hole=90,random=5,text=5");
    let summary = migrate(&keys, &source, &target, &["--compress", "zstd"]);
    assert_eq!(summary["verified"], true);
    assert_same_file(&source, &target);
    let size = 1u64 << 30;
    let allocated = allocated_bytes(&target);
    assert!(
        allocated * 100 <= size * 15,
        "target allocates {allocated} of {size} bytes (> 15 %)"
    );
    // Random extents do not compress but text does: the wire carries less than the data.
    let data = summary["bytes_data"].as_u64().unwrap();
    let wire = summary["bytes_wire"].as_u64().unwrap();
    assert!(
        wire < data,
        "zstd: {wire} bytes on the wire for {data} of data"
    );
}

#[test]
fn a_source_with_the_wrong_certificate_is_refused_before_any_data() {
    let dir = tempfile::tempdir().unwrap();
    let keys = keys(dir.path());
    let (intruder, _) = keygen(dir.path(), "intruder");
    let source = dir.path().join("src.img");
    let target = dir.path().join("dst.img");
    gen_image(&source, "4M", "random=100");
    let addr = free_udp_addr();
    let _serve = spawn_serve(addr, &[&target], &keys.target, &keys.source_fp);
    let output = tern()
        .args(["migrate", "--to", &addr.to_string(), "--identity"])
        .arg(&intruder)
        .args(["--peer", &keys.target_fp, "--image"])
        .arg(&source)
        .output()
        .unwrap();
    assert!(!output.status.success(), "an unknown source was accepted");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("certificate"), "unclear error: {stderr}");
    assert!(
        !target.exists(),
        "the target created its image for an unknown peer"
    );
}

#[test]
fn a_target_with_the_wrong_certificate_is_refused_by_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let keys = keys(dir.path());
    let (impostor, _) = keygen(dir.path(), "impostor");
    let source = dir.path().join("src.img");
    let target = dir.path().join("dst.img");
    gen_image(&source, "4M", "random=100");
    let addr = free_udp_addr();
    // The impostor target would accept our source, but the source pins the real target.
    let _serve = spawn_serve(addr, &[&target], &impostor, &keys.source_fp);
    let output = tern()
        .args(["migrate", "--to", &addr.to_string(), "--identity"])
        .arg(&keys.source)
        .args(["--peer", &keys.target_fp, "--image"])
        .arg(&source)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(!target.exists(), "data reached an impostor");
}

#[test]
fn a_target_image_of_another_size_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let keys = keys(dir.path());
    let source = dir.path().join("src.img");
    let target = dir.path().join("dst.img");
    gen_image(&source, "4M", "random=100");
    std::fs::write(&target, vec![7u8; 4096]).unwrap();
    let addr = free_udp_addr();
    let mut serve = spawn_serve(addr, &[&target], &keys.target, &keys.source_fp);
    let output = tern()
        .args(["migrate", "--to", &addr.to_string(), "--identity"])
        .arg(&keys.source)
        .args(["--peer", &keys.target_fp, "--image"])
        .arg(&source)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("size"), "unclear error: {stderr}");
    assert!(!serve.0.wait().unwrap().success());
    assert_eq!(std::fs::read(&target).unwrap(), vec![7u8; 4096]);
}

#[test]
fn a_rate_limit_caps_the_copy_bandwidth() {
    let dir = tempfile::tempdir().unwrap();
    let keys = keys(dir.path());
    let source = dir.path().join("src.img");
    let target = dir.path().join("dst.img");
    gen_image(&source, "24M", "random=100");
    let summary = migrate(
        &keys,
        &source,
        &target,
        &["--rate-limit", "32", "--compress", "off"],
    );
    assert_eq!(summary["verified"], true);
    assert_same_file(&source, &target);
    // 24 MiB of random data at 32 MiB/s takes at least ~0.75 s (minus one 10 ms burst).
    let seconds = summary["duration_s"].as_f64().unwrap();
    assert!(
        seconds >= 0.6,
        "24 MiB at a 32 MiB/s cap took only {seconds} s"
    );
}
