//! Faults with real processes: a link cut for longer than the idle timeout, a target killed
//! with SIGKILL and restarted, a target stopped with SIGSTOP past the idle timeout, and a
//! target file system that is too small or fills up. Each test ends either with
//! target == source (and checks how much was sent again), or with a clear error and the
//! source untouched — and checks which.
//!
//! The link runs through `tern_bench::netem::UdpProxy`, a real UDP proxy on loopback; the
//! tests cut it once a given number of bytes crossed (an event, not a timer).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tern_bench::netem::{Impairment, UdpProxy};
use tern_tests::{Logged, free_udp_addr, keygen, log_field, run, tern};

const IMAGE_MIB: u64 = 256;
/// What a lost link may cost, at most, whatever the disk's size and the load: the data
/// handed out and not yet confirmed durable (the source stops planning at 64 MiB, and what it
/// had planned by then — a transmit queue of 16 MiB, 16 reads of 1 MiB — still goes out),
/// plus the queue and the reads in flight at the moment of the cut.
const RESEND_BOUND: u64 = (64 + 2 * (16 + 16)) << 20;
/// Seconds of silence that make a link count as lost, on both sides (short, so the tests
/// are quick; keep-alives go every quarter of it).
const IDLE_S: &str = "1";
const WAIT: Duration = Duration::from_secs(60);

struct Setup {
    dir: tempfile::TempDir,
    source_id: PathBuf,
    source_fp: String,
    target_id: PathBuf,
    target_fp: String,
    source: PathBuf,
    target: PathBuf,
}

fn setup(mix: &str) -> Setup {
    setup_sized(mix, IMAGE_MIB)
}

fn setup_sized(mix: &str, mib: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (source_id, source_fp) = keygen(dir.path(), "source-id");
    let (target_id, target_fp) = keygen(dir.path(), "target-id");
    let source = dir.path().join("source.img");
    let target = dir.path().join("target.img");
    let output = run(&[
        "gen-image",
        "--out",
        source.to_str().unwrap(),
        "--size",
        &format!("{mib}M"),
        "--mix",
        mix,
        "--seed",
        "11",
    ]);
    assert!(output.status.success(), "gen-image: {output:?}");
    Setup {
        dir,
        source_id,
        source_fp,
        target_id,
        target_fp,
        source,
        target,
    }
}

fn serve(setup: &Setup, listen: SocketAddr, image: &Path) -> Logged {
    let mut command = tern();
    command
        .args(["serve", "--listen", &listen.to_string(), "--identity"])
        .arg(&setup.target_id)
        .args(["--peer", &setup.source_fp, "--log", "info"])
        .args(["--idle-timeout-s", IDLE_S, "--resume-window-s", "60"])
        .arg("--image")
        .arg(image);
    let mut serve = Logged::spawn(command);
    serve.wait_line("waiting for the source", WAIT);
    serve
}

fn migrate(setup: &Setup, to: SocketAddr, rate_mib: &str) -> Logged {
    migrate_with(setup, to, rate_mib, &[])
}

fn migrate_with(setup: &Setup, to: SocketAddr, rate_mib: &str, extra: &[&str]) -> Logged {
    let mut command = tern();
    command
        .args(["migrate", "--json", "--to", &to.to_string(), "--identity"])
        .arg(&setup.source_id)
        .args(["--peer", &setup.target_fp, "--image"])
        .arg(&setup.source)
        .args(["--rate-limit", rate_mib, "--log", "info"])
        .args(["--idle-timeout-s", IDLE_S, "--reconnect-window-s", "60"])
        .args(extra);
    Logged::spawn(command)
}

fn proxy_to(target: SocketAddr) -> UdpProxy {
    UdpProxy::start(
        "127.0.0.1:0".parse().unwrap(),
        target,
        Impairment::none(),
        Impairment::none(),
        7,
    )
    .unwrap()
}

fn same_file(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg(a)
        .arg(b)
        .status()
        .expect("run cmp")
        .success()
}

fn sha256(path: &Path) -> String {
    let output = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Waits for a successful migration and returns the bytes the resume queued again.
fn finish_resumed(setup: &Setup, migrate: Logged, serve: Logged) -> u64 {
    let (status, stdout, log) = migrate.finish();
    assert!(status.success(), "migrate failed:\n{}", log.join("\n"));
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON summary");
    assert_eq!(summary["verified"], true, "{summary}");
    let (status, _, serve_log) = serve.finish();
    assert!(status.success(), "serve failed:\n{}", serve_log.join("\n"));
    assert!(
        same_file(&setup.source, &setup.target),
        "target differs from source"
    );
    assert!(
        !tern_engine::driver::incomplete_marker(&setup.target).exists(),
        "a committed image has no marker"
    );
    let resumed: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("resumed on a new connection"))
        .collect();
    assert!(!resumed.is_empty(), "the migration never resumed");
    resumed
        .iter()
        .map(|l| {
            log_field(l, "bytes_requeued")
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum()
}

#[test]
fn a_link_cut_past_the_idle_timeout_resumes_without_a_full_copy() {
    let setup = setup("random=60,zero=20,text=20");
    let listen = free_udp_addr();
    let serve = serve(&setup, listen, &setup.target);
    let proxy = proxy_to(listen);
    let mut migrate = migrate(&setup, proxy.local_addr(), "96");
    // Mid-bulk: a third of the image crossed.
    assert!(proxy.wait_forwarded((IMAGE_MIB / 3) << 20, WAIT));
    proxy.cut();
    migrate.wait_line("link lost", WAIT);
    proxy.restore();
    let requeued = finish_resumed(&setup, migrate, serve);
    eprintln!(
        "link cut: {requeued} bytes sent again ({:.1} % of the image)",
        requeued as f64 * 100.0 / (IMAGE_MIB << 20) as f64
    );
    assert!(
        requeued <= RESEND_BOUND,
        "resumed with more than the in-flight window: {requeued} bytes"
    );
    assert!(proxy.stats().dropped_by_cut > 0, "the cut dropped nothing");
}

#[test]
fn a_lossy_duplicating_reordering_link_still_delivers_an_identical_copy() {
    // Both congestion controllers: CUBIC (the default) and BBR (`--congestion bbr`).
    for congestion in ["cubic", "bbr"] {
        let setup = setup_sized("random=50,text=25,zero=25", 32);
        let listen = free_udp_addr();
        let serve = serve(&setup, listen, &setup.target);
        let bad = Impairment {
            delay: Duration::from_millis(2),
            loss: 0.002,
            duplicate: 0.005,
            reorder: 0.01,
            ..Impairment::none()
        };
        let proxy =
            UdpProxy::start("127.0.0.1:0".parse().unwrap(), listen, bad.clone(), bad, 13).unwrap();
        let migrate = migrate_with(
            &setup,
            proxy.local_addr(),
            "1000",
            &["--congestion", congestion],
        );
        let (status, stdout, log) = migrate.finish();
        assert!(
            status.success(),
            "migrate ({congestion}) failed:\n{}",
            log.join("\n")
        );
        let summary: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON summary");
        assert_eq!(summary["verified"], true, "{congestion}: {summary}");
        let (status, _, _) = serve.finish();
        assert!(status.success());
        assert!(same_file(&setup.source, &setup.target), "{congestion}");
        let stats = proxy.stats();
        eprintln!("lossy link, {congestion}: {stats:?}; {summary}");
        assert!(
            stats.dropped > 0 && stats.duplicated > 0 && stats.reordered > 0,
            "{stats:?}"
        );
    }
}

#[test]
fn a_target_killed_mid_bulk_and_restarted_resumes_from_its_marker() {
    let setup = setup("random=100");
    let listen = free_udp_addr();
    let mut serve1 = serve(&setup, listen, &setup.target);
    let proxy = proxy_to(listen);
    let migrate = migrate(&setup, proxy.local_addr(), "96");
    assert!(proxy.wait_forwarded((IMAGE_MIB / 3) << 20, WAIT));
    serve1.child.0.kill().expect("SIGKILL the target");
    let _ = serve1.child.0.wait();
    assert!(
        tern_engine::driver::incomplete_marker(&setup.target).exists(),
        "the killed target left its image marked incomplete"
    );
    let mut serve2 = serve(&setup, listen, &setup.target);
    let line = serve2.wait_line("source resumes its session", WAIT);
    assert_eq!(
        log_field(&line, "resumed").as_deref(),
        Some("true"),
        "{line}"
    );
    let requeued = finish_resumed(&setup, migrate, serve2);
    eprintln!(
        "target restart: {requeued} bytes sent again ({:.1} % of the image)",
        requeued as f64 * 100.0 / (IMAGE_MIB << 20) as f64
    );
    assert!(
        requeued <= RESEND_BOUND,
        "too much sent again: {requeued} bytes"
    );
}

#[test]
fn a_target_stopped_past_the_idle_timeout_resumes_after_sigcont() {
    stop_past_the_idle_timeout(Stopped::Target);
}

/// A tmpfs of `mib` MiB mounted under `dir`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u64) -> Tmpfs {
        let path = dir.join(format!("fs-{mib}m"));
        std::fs::create_dir(&path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CI runs as root): {status}"
        );
        Tmpfs(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_target_too_small_is_refused_before_any_data_and_a_full_one_fails_cleanly() {
    let setup = setup("random=100");
    let before = sha256(&setup.source);

    // Too small from the start: refused at the handshake, nothing created.
    let small = Tmpfs::mount(setup.dir.path(), IMAGE_MIB / 2);
    let image = small.0.join("target.img");
    let listen = free_udp_addr();
    let serve_small = serve(&setup, listen, &image);
    let (status, _, log) = migrate(&setup, listen, "1000").finish();
    assert!(!status.success(), "a too-small target accepted the copy");
    assert!(
        log.iter().any(|l| l.contains("cannot hold")),
        "no clear error:\n{}",
        log.join("\n")
    );
    let (status, _, _) = serve_small.finish();
    assert!(!status.success());
    assert!(!image.exists(), "the refused target created its image");
    drop(small);

    // Room at the handshake, then the file system fills up mid-copy: a disk error names
    // ENOSPC, the target stays marked incomplete, the source is untouched.
    let fs = Tmpfs::mount(setup.dir.path(), IMAGE_MIB + 8);
    let image = fs.0.join("target.img");
    let listen = free_udp_addr();
    let mut serve_full = serve(&setup, listen, &image);
    let proxy = proxy_to(listen);
    let migrate = migrate(&setup, proxy.local_addr(), "96");
    serve_full.wait_line("target image open", WAIT);
    assert!(proxy.wait_forwarded((IMAGE_MIB / 4) << 20, WAIT));
    // Someone else fills the file system.
    let filler = fs.0.join("filler");
    let _ = std::fs::write(&filler, vec![1u8; (IMAGE_MIB as usize / 2 + 8) << 20]);
    let (status, _, log) = migrate.finish();
    assert!(!status.success(), "a full target completed the copy");
    assert!(
        log.iter()
            .any(|l| l.to_lowercase().contains("no space left on device")),
        "the error does not name ENOSPC:\n{}",
        log.join("\n")
    );
    let (status, _, _) = serve_full.finish();
    assert!(!status.success());
    assert!(
        tern_engine::driver::incomplete_marker(&image).exists(),
        "a failed target must stay marked incomplete"
    );
    assert_eq!(sha256(&setup.source), before, "the source changed");
}

#[test]
fn a_source_killed_mid_copy_and_run_again_resumes_its_session() {
    let setup = setup("random=70,zero=30");
    let listen = free_udp_addr();
    let mut serve = serve(&setup, listen, &setup.target);
    let proxy = proxy_to(listen);
    let mut first = migrate(&setup, proxy.local_addr(), "96");
    assert!(proxy.wait_forwarded((IMAGE_MIB / 3) << 20, WAIT));
    first.child.0.kill().expect("SIGKILL the source");
    let _ = first.child.0.wait();
    let record = {
        let mut name = setup.source.as_os_str().to_owned();
        name.push(".tern-session");
        PathBuf::from(name)
    };
    assert!(record.exists(), "the killed source left its session record");
    // The operator runs the same command again once the target noticed.
    serve.wait_line("keeping the session", WAIT);
    let second = migrate(&setup, proxy.local_addr(), "1000");
    let (status, stdout, log) = second.finish();
    assert!(status.success(), "the rerun failed:\n{}", log.join("\n"));
    assert!(
        log.iter()
            .any(|l| l.contains("resuming the session of a previous run")),
        "the rerun did not resume:\n{}",
        log.join("\n")
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON summary");
    assert_eq!(summary["verified"], true, "{summary}");
    let (status, _, _) = serve.finish();
    assert!(status.success());
    assert!(same_file(&setup.source, &setup.target));
    assert!(
        !record.exists(),
        "a finished migration keeps no session record"
    );
    let sent = summary["bytes_data"].as_u64().unwrap();
    eprintln!(
        "source restart: the rerun sent {sent} bytes of data ({:.1} % of the image)",
        sent as f64 * 100.0 / (IMAGE_MIB << 20) as f64
    );
    // What the first run got onto the target is not sent again.
    assert!(
        sent < (IMAGE_MIB << 20) * 7 / 10,
        "the rerun sent {sent} bytes: no better than a full copy of the data"
    );
}

#[test]
fn a_source_stopped_past_the_idle_timeout_resumes_after_sigcont() {
    stop_past_the_idle_timeout(Stopped::Source);
}

#[derive(Clone, Copy, Debug)]
enum Stopped {
    Source,
    Target,
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid}: {status}");
}

/// SIGSTOPs one side mid-bulk until the other gives the link up (its log says so), then
/// SIGCONTs it: both sides resume, sending again at most the in-flight window.
fn stop_past_the_idle_timeout(stopped: Stopped) {
    let setup = setup("random=50,text=50");
    let listen = free_udp_addr();
    let mut serve = serve(&setup, listen, &setup.target);
    let proxy = proxy_to(listen);
    let mut migrate = migrate(&setup, proxy.local_addr(), "96");
    assert!(proxy.wait_forwarded((IMAGE_MIB / 3) << 20, WAIT));
    let pid = match stopped {
        Stopped::Source => migrate.child.0.id(),
        Stopped::Target => serve.child.0.id(),
    };
    signal(pid, "-STOP");
    match stopped {
        // The target gives the silent source up and keeps the session.
        Stopped::Source => serve.wait_line("keeping the session", WAIT),
        Stopped::Target => migrate.wait_line("link lost", WAIT),
    };
    signal(pid, "-CONT");
    let requeued = finish_resumed(&setup, migrate, serve);
    eprintln!("{stopped:?} SIGSTOP/SIGCONT: {requeued} bytes sent again");
    assert!(
        requeued <= RESEND_BOUND,
        "too much sent again: {requeued} bytes"
    );
}
